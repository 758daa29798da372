"""CPU-experiment tokenizer (HF `tokenizers` is unavailable on the CPU box).

Mimics a small byte-level BPE on this data: frequent template words are single
tokens (with their leading space), invented names/rare words are split into 2-3
character chunks (~2-4 pieces per name, like the 4096-entry BPE), digits in
groups of up to 3.  Deterministic: vocabulary built from generated worlds.
"""
import collections
import re

import gen_data as G

PAT = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}|\n+| ?[^A-Za-z0-9\s]|\s+")


class WordChunkTok:
    bos, eos, pad = 0, 1, 2

    def __init__(self, n_worlds=6, min_count=30):
        cnt = collections.Counter()
        for i in range(n_worlds):
            w = G.World(f"cputok-{i}")
            for d in w.docs:
                cnt.update(PAT.findall(d["text"] + "\n\n"))
            for _, q, a, _ in w.q_single:
                cnt.update(PAT.findall("Question: " + q + "\nAnswer: " + a))
        words = [t for t, c in cnt.items() if c >= min_count and not t.strip()[:1].isupper() or
                 t.strip() in ("Question", "Answer", "The", "Some", "In", "Diary", "Travel", "Annual",
                               "Lab", "Compound", "Sample", "Records", "These", "Most", "As", "What",
                               "Which", "Who", "Where", "On", "Friends", "Every", "Revenue", "Costs",
                               "Note", "Batch", "We", "Children", "Many", "Nobody", "It", "There",
                               "Someone", "A", "Just", "Later", "That", "Early", "Around", "Before",
                               "After", "He", "She", "They", "People", "Analysts", "Room", "Industries",
                               "Labs", "Works", "Group", "Systems", "Foods", "Motors", "Textiles",
                               "Holdings", "Robotics", "Shipping", "Energy", "Pharma", "Media", "Mills")]
        chunks = set()
        letters = "abcdefghijklmnopqrstuvwxyz"
        for a in letters:
            for b in letters:
                chunks.add(a + b)
                chunks.add(a.upper() + b)
        singles = [chr(i) for i in range(32, 127)] + ["\n", "\n\n", " " + "\n"]
        singles += [" " + c for c in letters + letters.upper()]
        digits = [str(i) for i in range(1000)]
        digits += ["0" + str(i) for i in range(100)] + ["00" + str(i) for i in range(10)]
        vocab = ["<|bos|>", "<|eos|>", "<|pad|>"]
        seen = set(vocab)
        for t in sorted(words) + sorted(chunks) + singles + digits:
            if t not in seen:
                seen.add(t)
                vocab.append(t)
        self.itos = vocab
        self.stoi = {t: i for i, t in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self._cache = {}

    def _piece(self, t):
        r = self._cache.get(t)
        if r is not None:
            return r
        if t in self.stoi:
            r = [self.stoi[t]]
        else:
            r = []
            s = t
            if s[:1] == " " and len(s) > 1 and s[1].isalpha():
                first = s[:3]
                if first in self.stoi:
                    r.append(self.stoi[first]); s = s[3:]
                else:
                    r.append(self.stoi[s[:2]]); s = s[2:]
            while s:
                if s[:2] in self.stoi and len(s) >= 2:
                    r.append(self.stoi[s[:2]]); s = s[2:]
                elif s[:1] in self.stoi:
                    r.append(self.stoi[s[:1]]); s = s[1:]
                else:
                    r.append(self.stoi["?"]); s = s[1:]
        if len(self._cache) < 200000:
            self._cache[t] = r
        return r

    def encode(self, s):
        out = []
        for t in PAT.findall(s):
            out += self._piece(t)
        return out

    def encode_batch(self, ss):
        return [self.encode(s) for s in ss]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids if i > 2)
