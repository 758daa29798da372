#!/usr/bin/env node
// Tokenizer tool for the second RedKnot test model: HF `tokenizers` (Rust) through its Node binding
// (npm @anush008/tokenizers, a prebuilt native module: `cd scripts/corpus && npm ci`), because the
// CPU machine has neither Python `tokenizers` nor pip.  Same Rust code as Python `tokenizers`, so
// transformers on the GPU machine and RedKnot's C++ loader read the same ids (checked: `check`).
//
//   node scripts/corpus/tok.js train --vocab 16384 --out DIR TEXTFILE...
//       byte-level BPE with the Llama-3 split regex (the first test model's pre-tokenizer, which
//       RedKnot loads), specials <|bos|>=0 <|eos|>=1 <|pad|>=2, then the 256 byte symbols, then merges.
//       The binding's train() has no trainer options (vocab 30000, min_frequency 0), so it trains that
//       and keeps the first VOCAB-259 merges: BPE merges are learned greedily in order, so the first K
//       merges of a larger run are exactly the merges of a K-merge run.
//   node scripts/corpus/tok.js encode-jsonl --tokenizer T.json --in X.jsonl[.gz] --field text
//       --out Y.u16 [--suffix STR] [--eos]
//       one document per line; writes the concatenated uint16 ids (little endian) and Y.u16.idx
//       (uint32 little endian: n+1 document start offsets, in tokens; uint32 is enough for < 4G tokens).
//   node scripts/corpus/tok.js encode-lines --tokenizer T.json --in X.jsonl   (JSON string per line)
//       prints one JSON id list per line (small inputs: questions, answers)
//   node scripts/corpus/tok.js check --tokenizer T.json TEXT   prints the ids of TEXT
'use strict';
const fs = require('fs');
const zlib = require('zlib');
const path = require('path');
const readline = require('readline');
const T = require('@anush008/tokenizers');

const LLAMA3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const SPECIALS = ['<|bos|>', '<|eos|>', '<|pad|>'];

function args(argv) {
  const o = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith('--')) {
      const k = argv[i].slice(2);
      if (i + 1 < argv.length && !argv[i + 1].startsWith('--')) o[k] = argv[++i];
      else o[k] = true;
    } else o._.push(argv[i]);
  }
  return o;
}

function skeleton(vocab, merges) {
  const added = SPECIALS.map((c, i) => ({ id: i, content: c, single_word: false, lstrip: false, rstrip: false,
    normalized: false, special: true }));
  return {
    version: '1.0', truncation: null, padding: null, added_tokens: added, normalizer: null,
    pre_tokenizer: { type: 'Sequence', pretokenizers: [
      { type: 'Split', pattern: { Regex: LLAMA3 }, behavior: 'Isolated', invert: false },
      { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false }] },
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges },
  };
}

function train(o) {
  const V = parseInt(o.vocab || '16384', 10);
  fs.mkdirSync(o.out, { recursive: true });
  const tk = T.Tokenizer.fromString(JSON.stringify(skeleton({}, [])));
  const t0 = Date.now();
  tk.train(o._.slice(1));
  const raw = path.join(o.out, 'tokenizer.raw.json');
  tk.save(raw, false);
  const j = JSON.parse(fs.readFileSync(raw, 'utf8'));
  fs.unlinkSync(raw);
  let merges = j.model.merges.map((m) => (Array.isArray(m) ? m : m.split(' ')));
  const alphabet = T.byteLevelAlphabet().slice().sort();
  const K = V - SPECIALS.length - alphabet.length;
  if (merges.length < K) throw new Error(`only ${merges.length} merges learned, need ${K}`);
  merges = merges.slice(0, K);
  const vocab = {};
  SPECIALS.forEach((s, i) => { vocab[s] = i; });
  for (const a of alphabet) vocab[a] = Object.keys(vocab).length;
  for (const [a, b] of merges) {
    if (!(a in vocab) || !(b in vocab)) throw new Error(`merge ${a} ${b}: part missing`);
    const ab = a + b;
    if (!(ab in vocab)) vocab[ab] = Object.keys(vocab).length;
  }
  if (Object.keys(vocab).length !== V) {
    // a merge result can repeat an existing token only in degenerate cases; pad with more merges
    throw new Error(`vocab ${Object.keys(vocab).length} != ${V}`);
  }
  const out = path.join(o.out, 'tokenizer.json');
  fs.writeFileSync(out, JSON.stringify(skeleton(vocab, merges)));
  const cfg = { tokenizer_class: 'PreTrainedTokenizerFast', bos_token: '<|bos|>', eos_token: '<|eos|>',
    pad_token: '<|pad|>', add_bos_token: false, add_eos_token: false, model_max_length: 8192,
    clean_up_tokenization_spaces: false };
  fs.writeFileSync(path.join(o.out, 'tokenizer_config.json'), JSON.stringify(cfg, null, 2) + '\n');
  console.error(`trained in ${((Date.now() - t0) / 1000).toFixed(0)} s: vocab ${V}, ${K} merges -> ${out}`);
}

function lines(file) {
  let s = fs.createReadStream(file);
  if (file.endsWith('.gz')) s = s.pipe(zlib.createGunzip());
  return readline.createInterface({ input: s, crlfDelay: Infinity });
}

async function encodeJsonl(o) {
  const tk = T.Tokenizer.fromFile(o.tokenizer);
  const eos = tk.tokenToId('<|eos|>');
  const field = o.field || 'text';
  const suffix = typeof o.suffix === 'string' ? JSON.parse('"' + o.suffix + '"') : '';
  const fd = fs.openSync(o.out, 'w');
  const offs = [0];
  let n = 0, chars = 0, docs = 0, batch = [];
  const flush = async () => {
    if (!batch.length) return;
    const enc = await tk.encodeBatch(batch, { addSpecialTokens: false });
    let tot = 0;
    const arrs = enc.map((e) => { const ids = e.getIds(); if (o.eos) ids.push(eos); tot += ids.length; return ids; });
    const buf = new Uint16Array(tot);
    let p = 0;
    for (const ids of arrs) {
      for (const x of ids) { if (x > 65535) throw new Error('id > 65535'); buf[p++] = x; }
      n += ids.length;
      offs.push(n);
    }
    fs.writeSync(fd, Buffer.from(buf.buffer));
    batch = [];
  };
  for await (const line of lines(o.in)) {
    if (!line) continue;
    const t = JSON.parse(line)[field] + suffix;
    chars += t.length;
    docs++;
    batch.push(t);
    if (batch.length >= 256) await flush();
  }
  await flush();
  fs.closeSync(fd);
  fs.writeFileSync(o.out + '.idx', Buffer.from(new Uint32Array(offs).buffer));
  console.error(`${o.in}: ${docs} docs, ${chars} chars, ${n} tokens (${(chars / n).toFixed(3)} chars/token) -> ${o.out}`);
}

async function encodeLines(o) {
  const tk = T.Tokenizer.fromFile(o.tokenizer);
  const all = [];
  for await (const line of lines(o.in)) if (line) all.push(JSON.parse(line));
  const out = [];
  for (let i = 0; i < all.length; i += 1024) {
    const enc = await tk.encodeBatch(all.slice(i, i + 1024), { addSpecialTokens: false });
    for (const e of enc) out.push(JSON.stringify(e.getIds()));
  }
  process.stdout.write(out.join('\n') + (out.length ? '\n' : ''));
}

async function main() {
  const o = args(process.argv.slice(2));
  const cmd = o._[0];
  if (cmd === 'train') return train(o);
  if (cmd === 'encode-jsonl') return encodeJsonl(o);
  if (cmd === 'encode-lines') return encodeLines(o);
  if (cmd === 'check') {
    const tk = T.Tokenizer.fromFile(o.tokenizer);
    const e = await tk.encode(o._[1], null, { addSpecialTokens: false });
    console.log(JSON.stringify(e.getIds()));
    return;
  }
  console.error('usage: tok.js train|encode-jsonl|encode-lines|check ...');
  process.exit(2);
}
main().catch((e) => { console.error(e); process.exit(1); });
