#!/usr/bin/env python3
"""Synthetic multi-document RAG data for the RedKnot long-context test model.

Pure stdlib, deterministic by seed.  A *world* is a small consistent knowledge
base (people, companies, cities, compounds, diaries, filler essays) rendered as
documents; documents are the reuse units: every sample built from one world
draws its segments from the world's document pool, so the same document recurs
across samples at different positions (as in RAG chunk reuse).

Task families ("task" field):
  single     one fact, stated in one document, among many distractor facts
  multihop   two facts in two different documents (e.g. person -> employer in a
             biography, employer -> headquarters in a company report); the answer is
             "<bridge>, <final>" (e.g. "Nolo Industries, Kelmar"), so both hops are scored
  needle     haystack of filler documents with one "special magic number"
  dependent  document k ends by introducing "a <role> called <Name>", document
             k+1 starts with "The <role> I met at the end of my previous note
             later moved to <City>."; the question names <Name>.  Several such
             pairs with the SAME role appear in one sample (plus named
             "X later moved to Y" facts in biographies), so only attention from
             document k+1 to document k *while encoding* binds the city to the
             name.  Encoding documents independently (naive reuse) loses it.

Prompt format (shared with train.py and the C++ eval harness):
  ids = [BOS] + tok(seg_1 + "\\n\\n") + ... + tok(seg_n + "\\n\\n")
        + tok("Question: " + question + "\\nAnswer:")
  target = tok(" " + answer) + [EOS]
each piece tokenized separately.

CLI:  gen_data.py --tokens 8192 --per-task 200 --seed 8001 --out data/eval/rag-8k.jsonl.gz
"""
import argparse
import gzip
import json
import math
import random
import sys

TASKS = ("single", "multihop", "needle", "dependent")
# chars per token of the trained 4096-entry byte-level BPE on this text
# (measured on the GPU machine with the trained tokenizer; used only when no
# real tokenizer is available).
DEFAULT_CPT = 4.2  # measured 4.41 (smoke run, H200); ~5% margin so prompts stay <= target
QUESTION_RESERVE = 48  # tokens kept free for BOS + question + answer

# ----------------------------------------------------------------- vocabulary
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "kr", "tr", "st", "th", "sh", "gr", "pl", "h", "j", "w", "fl", "sk", "qu", "c"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia", "y"]
CODAS = ["", "", "", "", "n", "r", "l", "s", "th", "k", "m", "nd", "rk", "x", "sh", "t"]
CITY_SUFFIX = ["", "", "", "", "ia", "heim", "port", "ford", "grad", "vale", "mouth", "stad"]
COMPANY_SUFFIX = ["Industries", "Labs", "Works", "Group", "Systems", "Foods", "Motors", "Textiles",
                  "Holdings", "Robotics", "Shipping", "Energy", "Pharma", "Media", "Mills"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "crimson", "teal", "violet",
           "amber", "silver", "golden", "indigo", "turquoise", "magenta", "olive", "maroon",
           "scarlet", "ivory", "cyan", "bronze", "lavender", "emerald", "pink"]
ROLES = ["sailor", "painter", "baker", "carpenter", "teacher", "fisherman", "merchant", "doctor",
         "musician", "farmer", "engineer", "librarian", "tailor", "pilot", "gardener", "chemist",
         "poet", "blacksmith", "nurse", "architect"]
ANIMALS = ["cat", "dog", "parrot", "tortoise", "rabbit", "goat", "horse", "hamster", "owl", "ferret"]
ADJ = ["quiet", "busy", "old", "narrow", "bright", "windy", "crowded", "peaceful", "ancient",
       "modern", "muddy", "sunny", "foggy", "charming", "noisy", "green", "steep", "long", "cold",
       "warm", "small", "large", "beautiful", "dusty", "famous", "hidden", "wooden", "stone"]
PLACES = ["harbour", "market", "library", "bridge", "square", "museum", "garden", "station",
          "cathedral", "bakery", "river bank", "tea house", "old town", "lighthouse", "workshop",
          "hill", "forest path", "village", "castle", "park", "theatre", "canal", "valley"]
ACTIVITIES = ["walking along the river", "reading old books", "cooking for friends",
              "playing chess", "repairing bicycles", "painting landscapes", "growing tomatoes",
              "collecting stamps", "swimming in the lake", "writing letters", "playing the violin",
              "watching birds", "baking bread", "hiking in the mountains", "fishing at dawn",
              "learning languages", "building model ships", "singing in a choir"]
FOODS = ["soup", "bread", "fish stew", "apple cake", "roasted nuts", "cheese", "dumplings",
         "pancakes", "noodles", "lentils", "plum jam", "grilled corn", "honey cakes", "rice"]
WEATHER = ["rain", "snow", "wind", "sunshine", "fog", "heat", "frost", "storms", "drizzle"]
TIMES = ["In the morning", "Later that day", "In the afternoon", "That evening", "At noon",
         "Early the next day", "Around midnight", "Before sunrise", "After lunch", "On Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
TOPICS = ["the history of bridges", "the migration of birds", "old sailing routes", "the art of bread",
          "mountain weather", "the chemistry of dyes", "river ecology", "ancient coins",
          "village festivals", "the growth of forests", "clock making", "the tides",
          "glass blowing", "beekeeping", "early printing", "the salt trade"]
QUARTERS = ["first", "second", "third", "fourth"]


def _syl(rng):
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _word(rng, lo=2, hi=3):
    return "".join(_syl(rng) for _ in range(rng.randint(lo, hi))).capitalize()


class _Names:
    """Unique pronounceable names inside one world."""

    def __init__(self, rng):
        self.rng, self.used = rng, set()

    def _uniq(self, f, nparts=9):
        for _ in range(1000):
            s = f()
            parts = [p.lower() for p in s.split()[:nparts]]
            if all(p not in self.used for p in parts):
                self.used.update(parts)
                return s
        raise RuntimeError("name space exhausted")

    def person(self):
        return self._uniq(lambda: _word(self.rng, 2, 2) + " " + _word(self.rng, 2, 3))

    def city(self):
        return self._uniq(lambda: _word(self.rng, 2, 3) + self.rng.choice(CITY_SUFFIX))

    def company(self):
        return self._uniq(lambda: _word(self.rng, 2, 2) + " " + self.rng.choice(COMPANY_SUFFIX), 1)

    def single(self, lo=2, hi=3, suffix=""):
        return self._uniq(lambda: _word(self.rng, lo, hi) + suffix)


# ------------------------------------------------------------------- fillers
def _filler_general(rng, pron="they", city=None):
    c = city or "the town"
    t = rng.randrange(14)
    if t == 0:
        return f"{rng.choice(TIMES)}, the {rng.choice(ADJ)} {rng.choice(PLACES)} was full of people."
    if t == 1:
        return f"The {rng.choice(WEATHER)} lasted for {rng.randint(2, 9)} days, and the streets of {c} were {rng.choice(ADJ)}."
    if t == 2:
        return f"Many visitors enjoy {rng.choice(ACTIVITIES)} near the {rng.choice(PLACES)}."
    if t == 3:
        return f"A local cook served {rng.choice(FOODS)} with {rng.choice(FOODS)}, which was surprisingly good."
    if t == 4:
        return f"In {rng.choice(MONTHS)} the {rng.choice(PLACES)} is usually {rng.choice(ADJ)} and {rng.choice(ADJ)}."
    if t == 5:
        return f"Someone once wrote a long book about {rng.choice(TOPICS)}, but few people have read it."
    if t == 6:
        return f"The road to the {rng.choice(PLACES)} is {rng.choice(ADJ)}, so most people take the {rng.choice(['bus', 'train', 'ferry', 'tram'])}."
    if t == 7:
        return f"There are about {rng.randint(3, 90)} {rng.choice(['shops', 'houses', 'boats', 'trees', 'benches', 'lamps'])} around the {rng.choice(PLACES)}."
    if t == 8:
        return f"Nobody remembers when the {rng.choice(ADJ)} {rng.choice(PLACES)} was built."
    if t == 9:
        return f"{pron.capitalize()} spent the {rng.choice(['morning', 'afternoon', 'evening', 'weekend'])} {rng.choice(ACTIVITIES)}."
    if t == 10:
        return f"The price of {rng.choice(FOODS)} went up again this {rng.choice(['spring', 'summer', 'autumn', 'winter'])}."
    if t == 11:
        return f"Children were {rng.choice(ACTIVITIES)} while their parents talked about {rng.choice(TOPICS)}."
    if t == 12:
        return f"It is said that the {rng.choice(PLACES)} looks {rng.choice(ADJ)} in the {rng.choice(WEATHER)}."
    return f"The {rng.choice(ADJ)} smell of {rng.choice(FOODS)} drifted from the {rng.choice(PLACES)}."


def _filler_bio(rng, name, pr):
    last = name.split()[-1]
    t = rng.randrange(8)
    if t == 0:
        return f"As a child, {last} loved {rng.choice(ACTIVITIES)}."
    if t == 1:
        return f"{pr[0].capitalize()} is known among friends for {rng.choice(ACTIVITIES)}."
    if t == 2:
        return f"Friends describe {last} as {rng.choice(['patient', 'curious', 'stubborn', 'generous', 'cheerful', 'shy', 'careful'])} and {rng.choice(['kind', 'funny', 'serious', 'honest', 'calm'])}."
    if t == 3:
        return f"Every {rng.choice(MONTHS)}, {last} visits the {rng.choice(ADJ)} {rng.choice(PLACES)}."
    if t == 4:
        return f"{pr[0].capitalize()} prefers {rng.choice(FOODS)} to {rng.choice(FOODS)}."
    if t == 5:
        return f"In {pr[1]} free time, {last} reads about {rng.choice(TOPICS)}."
    return _filler_general(rng, pr[0])


def _filler_company(rng, comp):
    t = rng.randrange(7)
    if t == 0:
        return f"Revenue of {comp} rose by {rng.randint(2, 40)} percent in the {rng.choice(QUARTERS)} quarter."
    if t == 1:
        return f"The board expects {rng.choice(['steady', 'slow', 'strong', 'modest'])} growth next year."
    if t == 2:
        return f"The company employs about {rng.randint(2, 90) * 10} people."
    if t == 3:
        return f"Costs for {rng.choice(['shipping', 'energy', 'materials', 'rent', 'marketing'])} were {rng.choice(['higher', 'lower'])} than planned."
    if t == 4:
        return f"A new {rng.choice(['factory', 'office', 'warehouse', 'store'])} opened near the {rng.choice(PLACES)}."
    if t == 5:
        return f"Analysts called the results {rng.choice(['solid', 'disappointing', 'surprising', 'encouraging'])}."
    return _filler_general(rng, "the staff")


def _filler_lab(rng):
    t = rng.randrange(6)
    if t == 0:
        return f"The centrifuge ran at {rng.randint(10, 90) * 100} rpm for {rng.randint(2, 40)} minutes."
    if t == 1:
        return f"Room temperature was {rng.randint(17, 26)} degrees and humidity {rng.randint(20, 80)} percent."
    if t == 2:
        return f"The {rng.choice(['pipette', 'balance', 'microscope', 'oven', 'pump'])} was cleaned and recalibrated."
    if t == 3:
        return f"Batch {rng.randint(10, 999)} was discarded because of {rng.choice(['contamination', 'a leak', 'a labelling error', 'low yield'])}."
    if t == 4:
        return f"We repeated the {rng.choice(['titration', 'filtration', 'measurement', 'extraction'])} {rng.randint(2, 6)} times."
    return f"Note: order more {rng.choice(['gloves', 'vials', 'filter paper', 'ethanol', 'tape'])} before {rng.choice(MONTHS)}."


def _interleave(rng, facts, fillers, keep_first=0):
    """Place fact sentences among filler sentences (order of facts kept)."""
    head = fillers[:keep_first]
    rest = fillers[keep_first:]
    out = list(rest)
    pos = sorted(rng.randint(0, len(rest)) for _ in facts)
    for i, (p, f) in enumerate(zip(pos, facts)):
        out.insert(p + i, f)
    return head + out


# --------------------------------------------------------------------- world
class World:
    """A consistent set of entities and their documents."""

    def __init__(self, seed, scale=1.0, multihop_answer="bridge"):
        rng = random.Random(seed)
        self.rng = rng
        nm = _Names(rng)
        n = lambda k: max(2, int(round(k * scale)))
        self.docs = []        # list of dict(text, kind)
        self.q_single = []    # (doc_idx, question, answer, subtype)
        self.q_multi = []     # (doc_a, doc_b, question, answer, subtype)
        self.needles = []     # (doc_idx, question, answer)
        self.pairs = []       # (doc_a, doc_b, question, answer, role)
        self.fillers = []     # doc indices with no askable facts

        cities = [nm.city() for _ in range(n(24))]
        rivers = [nm.single(2, 2) for _ in range(n(10))]
        companies = [nm.company() for _ in range(n(16))]
        persons = [nm.person() for _ in range(n(40))]
        mayors = {c: nm.person() for c in cities}
        p_info = {}
        for p in persons:
            p_info[p] = dict(born=rng.choice(cities), year=rng.randint(1930, 2001),
                             comp=rng.choice(companies), role=rng.choice(ROLES),
                             colour=rng.choice(COLOURS), animal=rng.choice(ANIMALS),
                             pet=nm.single(2, 2), moved=rng.choice(cities),
                             pr=rng.choice([("he", "his"), ("she", "her")]))
        c_info = {}
        for c in companies:
            c_info[c] = dict(hq=rng.choice(cities), year=rng.randint(1850, 2015),
                             founder=rng.choice(persons), product=nm.single(2, 2))
        city_info = {c: dict(mayor=mayors[c], river=rng.choice(rivers), roof=rng.choice(COLOURS))
                     for c in cities}

        def add(text, kind):
            self.docs.append(dict(text=text, kind=kind))
            return len(self.docs) - 1

        # biographies
        bio_doc = {}
        for p in persons:
            i = p_info[p]
            facts = [
                ("born", rng.choice([f"{p} was born in {i['born']} in {i['year']}.",
                                     f"{p} was born in the city of {i['born']}.",
                                     f"Records show that {p} was born in {i['born']}."]),
                 f"In which city was {p} born?", i["born"]),
                ("works", rng.choice([f"{p} works for {i['comp']} as a {i['role']}.",
                                      f"These days {p} works for {i['comp']}.",
                                      f"{p} works for {i['comp']}, where {i['pr'][0]} is a {i['role']}."]),
                 f"Which company does {p} work for?", i["comp"]),
                ("colour", rng.choice([f"The favourite colour of {p} is {i['colour']}.",
                                       f"{p} says that {i['colour']} is {i['pr'][1]} favourite colour."]),
                 f"What is the favourite colour of {p}?", i["colour"]),
                ("pet", f"{p} has a pet {i['animal']} called {i['pet']}.",
                 f"What is the name of the pet {i['animal']} of {p}?", i["pet"]),
                ("moved", rng.choice([f"{p} later moved to {i['moved']}.",
                                      f"Some years later, {p} moved to {i['moved']}."]),
                 f"Where did {p} later move to?", i["moved"]),
            ]
            rng.shuffle(facts)
            fill = [_filler_bio(rng, p, i["pr"]) for _ in range(rng.randint(4, 9))]
            sents = _interleave(rng, [f[1] for f in facts], fill)
            d = add(" ".join(sents), "biography")
            bio_doc[p] = d
            for sub, _, q, a in facts:
                self.q_single.append((d, q, a, "bio_" + sub))
        # company reports
        comp_doc = {}
        for c in companies:
            i = c_info[c]
            facts = [
                ("hq", rng.choice([f"{c} is headquartered in {i['hq']}.",
                                   f"The headquarters of {c} are in {i['hq']}."]),
                 f"In which city is {c} headquartered?", i["hq"]),
                ("founded", f"{c} was founded in {i['year']} by {i['founder']}.",
                 f"In which year was {c} founded?", str(i["year"])),
                ("product", rng.choice([f"The best-selling product of {c} is the {i['product']}.",
                                        f"Most of the profit of {c} comes from the {i['product']}, its best-selling product."]),
                 f"What is the best-selling product of {c}?", i["product"]),
            ]
            rng.shuffle(facts)
            fill = [_filler_company(rng, c) for _ in range(rng.randint(5, 10))]
            title = f"Annual report of {c}."
            sents = [title] + _interleave(rng, [f[1] for f in facts], fill)
            d = add(" ".join(sents), "company_report")
            comp_doc[c] = d
            for sub, _, q, a in facts:
                self.q_single.append((d, q, a, "company_" + sub))
        # travel notes
        city_doc = {}
        for c in cities:
            i = city_info[c]
            facts = [
                ("mayor", rng.choice([f"The mayor of {c} is {i['mayor']}.",
                                      f"{i['mayor']} is the current mayor of {c}."]),
                 f"Who is the mayor of {c}?", i["mayor"]),
                ("river", f"{c} lies on the banks of the {i['river']} river.",
                 f"On which river does {c} lie?", i["river"]),
                ("roof", f"Most houses in {c} have {i['roof']} roofs.",
                 f"What colour are the roofs of most houses in {c}?", i["roof"]),
            ]
            rng.shuffle(facts)
            fill = [_filler_general(rng, "we", c) for _ in range(rng.randint(5, 10))]
            sents = [f"Travel notes from {c}."] + _interleave(rng, [f[1] for f in facts], fill)
            d = add(" ".join(sents), "travel_note")
            city_doc[c] = d
            for sub, _, q, a in facts:
                self.q_single.append((d, q, a, "city_" + sub))
        # lab logs
        for _ in range(n(10)):
            comp_names = [nm.single(2, 2, "ite") for _ in range(2)]
            samp = nm.single(1, 1).upper() + "-" + str(rng.randint(10, 99))
            col = rng.choice(COLOURS)
            freezer = str(rng.randint(2, 60))
            facts = [
                ("compound", f"Compound {comp_names[0]} turned {col} after heating.",
                 f"What colour did compound {comp_names[0]} turn after heating?", col),
                ("freezer", f"Sample {samp} was stored in freezer number {freezer}.",
                 f"In which freezer was sample {samp} stored?", freezer),
            ]
            fill = [_filler_lab(rng) for _ in range(rng.randint(5, 9))]
            fill.insert(rng.randint(0, len(fill)), f"Compound {comp_names[1]} was kept in the dark.")
            sents = [f"Lab log, {rng.choice(MONTHS)} {rng.randint(1, 28)}."] + _interleave(rng, [f[1] for f in facts], fill)
            d = add(" ".join(sents), "lab_log")
            for sub, _, q, a in facts:
                self.q_single.append((d, q, a, "lab_" + sub))
        # diaries with in-document coreference ("a sailor called X ... The sailor later moved to Y")
        for _ in range(n(10)):
            who = nm.person()
            role = rng.choice(ROLES)
            city = rng.choice(cities)
            fill = [_filler_general(rng, "we") for _ in range(rng.randint(5, 9))]
            k = rng.randint(1, len(fill) - 2)
            fill.insert(k, f"{rng.choice(TIMES)}, I was introduced to a {role} called {who}.")
            fill.insert(k + rng.randint(2, 3), f"The {role} later moved to {city}.")
            d = add(f"Diary, {rng.choice(MONTHS)} {rng.randint(1, 28)}. " + " ".join(fill), "diary")
            self.q_single.append((d, f"Where did {who} later move to?", city, "diary_moved"))
        # filler essays (no askable facts)
        for _ in range(n(50)):
            topic = rng.choice(TOPICS)
            sents = [f"Some notes on {topic}."] + [_filler_general(rng, rng.choice(["we", "they", "people"]), rng.choice(cities))
                                                   for _ in range(rng.randint(6, 12))]
            self.fillers.append(add(" ".join(sents), "essay"))
        # needles: a filler essay with one magic number
        for _ in range(n(12)):
            who = nm.person()
            num = str(rng.randint(1000, 999999))
            sents = [f"Some notes on {rng.choice(TOPICS)}."] + [_filler_general(rng, "we") for _ in range(rng.randint(6, 12))]
            sents.insert(rng.randint(1, len(sents)), f"The special magic number of {who} is {num}.")
            d = add(" ".join(sents), "essay")
            self.needles.append((d, f"What is the special magic number of {who}?", num))
        # dependent pairs (few roles per world so that same-role distractor pairs exist)
        dep_roles = rng.sample(ROLES, 3)
        for _ in range(n(24)):
            who = nm.person()
            role = rng.choice(dep_roles)
            city = rng.choice(cities)
            a_fill = [_filler_general(rng, "we") for _ in range(rng.randint(5, 9))]
            other_role = rng.choice([r for r in ROLES if r != role])
            a_fill.insert(rng.randint(0, len(a_fill) - 1),
                          f"{rng.choice(TIMES)}, a {other_role} called {nm.person()} showed me the {rng.choice(PLACES)}.")
            a_text = (f"Diary, {rng.choice(MONTHS)} {rng.randint(1, 28)}. " + " ".join(a_fill) +
                      f" Just before I left, I was introduced to a {role} called {who}.")
            b_first = rng.choice([f"The {role} I met at the end of my previous note later moved to {city}.",
                                  f"As for the {role} from the end of my previous note, {rng.choice(['he', 'she'])} later moved to {city}."])
            b_fill = [_filler_general(rng, "we") for _ in range(rng.randint(4, 8))]
            b_fill.insert(rng.randint(1, len(b_fill)),
                          f"{nm.person()} later moved to {rng.choice(cities)}.")
            b_text = "Diary, continued. " + b_first + " " + " ".join(b_fill)
            da, db = add(a_text, "diary_dep_a"), add(b_text, "diary_dep_b")
            self.pairs.append((da, db, f"Where did {who} later move to?", city, role))
        # multihop questions.  The answer names the bridge entity first ("<bridge>, <answer>"): the model
        # reads hop 1 from the question and hop 2 from its own first words, and exact match needs both hops
        # right.  (Runs 1-6 asked for the final answer alone, a two-hop retrieval inside one forward pass;
        # this 7M-parameter model never learned that at 8K: 20 EM.)
        # multihop_answer="final" gives runs 1-6's answers (the final one alone): it reproduces the first
        # call of the shipped model's training, which started from run 4's weights.
        if multihop_answer not in ("bridge", "final"):
            raise ValueError(f"multihop_answer must be bridge or final, not {multihop_answer!r}")
        hop = (lambda bridge, final: f"{bridge}, {final}") if multihop_answer == "bridge" else (lambda bridge, final: final)
        for p in persons:
            i = p_info[p]
            c = i["comp"]
            self.q_multi.append((bio_doc[p], comp_doc[c],
                                 f"In which city is the company that {p} works for headquartered?",
                                 hop(c, c_info[c]['hq']), "employer_hq"))
            self.q_multi.append((bio_doc[p], comp_doc[c],
                                 f"What is the best-selling product of the company that {p} works for?",
                                 hop(c, c_info[c]['product']), "employer_product"))
            self.q_multi.append((bio_doc[p], city_doc[i["born"]],
                                 f"Who is the mayor of the city where {p} was born?",
                                 hop(i['born'], city_info[i['born']]['mayor']), "birthplace_mayor"))
        for c in companies:
            f = c_info[c]["founder"]
            self.q_multi.append((comp_doc[c], bio_doc[f],
                                 f"What is the favourite colour of the person who founded {c}?",
                                 hop(f, p_info[f]['colour']), "founder_colour"))
        self.fact_docs = sorted(set(q[0] for q in self.q_single) - set(n[0] for n in self.needles))
        self.pair_docs = set()
        for a, b, *_ in self.pairs:
            self.pair_docs.update((a, b))
        self.plain_fact_docs = [d for d in self.fact_docs if d not in self.pair_docs]


def est_len(text, cpt=DEFAULT_CPT):
    return int(math.ceil((len(text) + 2) / cpt))


def make_sample(world, task, budget, rng, doc_len=None, q_len=None, prefer=None, single_pool=None):
    """Build one sample of `task` with at most ~`budget` tokens.

    doc_len(doc_idx) -> tokens of tok(doc + "\\n\\n"); default: chars/DEFAULT_CPT.
    prefer: training only, distractor documents tried before the shuffled pool (None: the eval sets'
    behaviour, unchanged random draws).
    single_pool: training only, the single-fact questions to draw from (None: all of world.q_single).
    Returns dict(segments=[doc_idx...], question, answers, task, subtype, gold=[segment indices]).
    """
    if doc_len is None:
        doc_len = lambda d: est_len(world.docs[d]["text"])
    units = []      # list of lists of doc indices (kept contiguous)
    used = set()
    if task == "single":
        d, q, a, sub = rng.choice(single_pool or world.q_single)
        units.append([d])
        gold_docs = [d]
    elif task == "multihop":
        da, db, q, a, sub = rng.choice(world.q_multi)
        units += [[da], [db]]
        gold_docs = [da, db]
    elif task == "needle":
        d, q, a = rng.choice(world.needles)
        sub = "magic_number"
        units.append([d])
        gold_docs = [d]
    elif task == "dependent":
        da, db, q, a, role = rng.choice(world.pairs)
        sub = "coref_" + role
        units.append([da, db])
        gold_docs = [da, db]
        same = [p for p in world.pairs if p[4] == role and p[0] != da]
        rng.shuffle(same)
        for p in same[:rng.randint(2, 4)]:
            units.append([p[0], p[1]])
    else:
        raise ValueError(task)
    for u in units:
        used.update(u)
    total = 1 + (q_len(q, a) if q_len else QUESTION_RESERVE)
    # mandatory units must fit: drop distractor pairs if needed
    while True:
        need = sum(doc_len(d) for u in units for d in u)
        if total + need <= budget or len(units) <= (2 if task == "multihop" else 1):
            break
        dropped = units.pop()
        used.difference_update(dropped)
    total += sum(doc_len(d) for u in units for d in u)
    # distractor pool
    if task == "needle":
        pool = list(world.fillers)
    else:
        pool = list(world.plain_fact_docs) + list(world.fillers)
        if task == "dependent":
            # other distractor pairs of different roles are also fine
            pool += [d for d in world.plain_fact_docs if world.docs[d]["kind"] == "biography"]
    rng.shuffle(pool)
    if prefer:
        pool = list(prefer) + pool
    fails = 0
    for d in pool:
        if d in used:
            continue
        L = doc_len(d)
        if total + L > budget:
            fails += 1
            if fails > 8:
                break
            continue
        units.append([d])
        used.add(d)
        total += L
    rng.shuffle(units)
    segs = [d for u in units for d in u]
    gold = [i for i, d in enumerate(segs) if d in gold_docs]
    return dict(segments=segs, question=q, answers=[a], task=task, subtype=sub, gold=gold)


def sample_to_json(world, s, world_id):
    out = dict(s)
    out["doc_ids"] = [f"{world_id}:{d}" for d in s["segments"]]
    out["segments"] = [world.docs[d]["text"] for d in s["segments"]]
    return out


def generate(tokens, per_task, seed, samples_per_world=25, cpt=DEFAULT_CPT, tasks=TASKS, multihop_answer="bridge"):
    """Deterministic eval/test set: per_task samples of each family."""
    scale = max(1.0, tokens / 8192.0)
    out = []
    order = [t for t in tasks for _ in range(per_task)]
    rng = random.Random(f"order-{seed}")
    rng.shuffle(order)
    world = None
    for k, task in enumerate(order):
        if k % samples_per_world == 0:
            wid = f"eval{seed}-w{k // samples_per_world}"
            world = World(wid, scale, multihop_answer)
        srng = random.Random(f"eval{seed}-s{k}")
        s = make_sample(world, task, tokens, srng, doc_len=lambda d: est_len(world.docs[d]["text"], cpt))
        j = sample_to_json(world, s, wid)
        j["id"] = f"rag{tokens}-{seed}-{k}"
        out.append(j)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="target prompt length in tokens (estimated)")
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--seed", type=int, default=8001, help="eval seed; training uses string seeds 'train-*'")
    ap.add_argument("--cpt", type=float, default=DEFAULT_CPT, help="chars per token estimate")
    ap.add_argument("--samples-per-world", type=int, default=25)
    ap.add_argument("--out", default="-")
    a = ap.parse_args()
    data = generate(a.tokens, a.per_task, a.seed, a.samples_per_world, a.cpt)
    if a.out == "-":
        f = sys.stdout
    elif a.out.endswith(".gz"):
        f = gzip.open(a.out, "wt", encoding="utf-8", compresslevel=9)
    else:
        f = open(a.out, "w", encoding="utf-8")
    for j in data:
        f.write(json.dumps(j, ensure_ascii=True) + "\n")
    if f is not sys.stdout:
        f.close()
    n = sum(len(s) for j in data for s in j["segments"])
    print(f"wrote {len(data)} samples, mean {n / len(data):.0f} chars of documents", file=sys.stderr)


if __name__ == "__main__":
    main()
