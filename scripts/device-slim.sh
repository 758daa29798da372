#!/usr/bin/env bash
# The GPU machine gets a copy of the working tree (tracked + untracked-not-ignored files + carry), 64 MiB
# per call. The shipped models' weights and the first model's eval sets take most of that, and most calls
# do not need them. This script switches to a local branch `devslim` = HEAD minus PATHS (default: the
# first model's weights and eval sets), lists them in .git/info/exclude so they stay on disk but do not
# travel, and `--back` returns to the branch it came from and removes both. Never push devslim.
#   bash scripts/device-slim.sh [PATH ...]     # then call the device
#   bash scripts/device-slim.sh --back
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--back" ]; then
  from="$(cat .git/device-slim-from 2>/dev/null || echo main)"
  [ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "commit or stash first" >&2; exit 1; }
  git switch -q -f "$from"   # -f: the excluded files are untracked here and tracked (same bytes) there
  git branch -q -D devslim
  sed -i '/^# device-slim begin$/,/^# device-slim end$/d' .git/info/exclude
  rm -f .git/device-slim-from
  echo "back on $from"
  exit 0
fi
[ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "commit or stash first" >&2; exit 1; }
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(models/redknot-rag-8k/model.safetensors data/eval/rag-4k.jsonl.gz data/eval/rag-8k.jsonl.gz)
git rev-parse --abbrev-ref HEAD >.git/device-slim-from
git switch -q -c devslim
git rm -q --cached -r -- "${paths[@]}"
git commit -q -m "devslim: without ${paths[*]} (local, for the 64 MiB device carry)"
{ echo "# device-slim begin"; for p in "${paths[@]}"; do echo "/$p"; done; echo "# device-slim end"; } >>.git/info/exclude
echo "on devslim; tracked files now $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
