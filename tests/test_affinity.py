"""Prefix-affinity routing's policy (pltkit.serve.affinity), without Ray: an editor's growing
prompt stays on the replica that took its prefix, new prompts spread, and load decides when it
is out of balance. The Ray side runs in tests/test_serve_ray.py."""

import json
from collections import Counter
from pathlib import Path
import textwrap as stdlib_textwrap

import pytest

from pltkit.serve.affinity import BLOCK, HOME_CHARS, PrefixIndex, PromptKey, home, prompt_text, ranked

REPLICAS = ["r1", "r2", "r3"]
FILE = Path(stdlib_textwrap.__file__).read_text()


def key(text):
    return PromptKey.of(text)


def route(text, index, loads=None, **kw):
    """The replica a request goes to when the first rank accepts it, and what the router records."""
    ranks = ranked(key(text), REPLICAS, loads or {}, index, **kw)
    choice = ranks[0][0]
    index.record(key(text), choice)
    return choice, ranks


def test_a_growing_prompt_stays_on_its_replica():
    index = PrefixIndex()
    first, _ = route(FILE[:2000], index)
    for end in range(2003, 6000, 3):  # one keystroke at a time
        assert route(FILE[:end], index)[0] == first


def test_the_longest_indexed_prefix_wins():
    index = PrefixIndex()
    index.record(key(FILE[:4000]), "r2")
    index.record(key(FILE[:1000]), "r3")  # the first 1000 characters now last went to r3
    assert index.match(key(FILE[:5000]), REPLICAS) == ("r2", 4000 // BLOCK * BLOCK)
    assert index.match(key(FILE[:5000]), ["r1", "r3"]) == ("r3", 1000 // BLOCK * BLOCK)  # r2 is gone
    assert index.match(key("x" + FILE[:5000]), REPLICAS) == (None, 0)


def test_new_prompts_spread_and_their_home_is_stable():
    homes = Counter(home(f"# file {i}\n" + FILE[:HOME_CHARS], REPLICAS) for i in range(600))
    print("homes of 600 files over 3 replicas:", dict(homes))
    assert set(homes) == set(REPLICAS) and min(homes.values()) > 120
    text = FILE[:3000]
    assert home(text, REPLICAS) == home(text[:HOME_CHARS], list(reversed(REPLICAS)))  # order, tail do not matter
    # a replica going away moves only its own texts
    texts = [f"# file {i}\n" for i in range(300)]
    before = {t: home(t, REPLICAS) for t in texts}
    after = {t: home(t, ["r1", "r2"]) for t in texts}
    assert all(after[t] == before[t] for t in texts if before[t] != "r3")


def test_an_imbalanced_load_falls_back_to_the_least_loaded():
    index = PrefixIndex()
    index.record(key(FILE[:3000]), "r1")
    assert route(FILE[:3100], index, {"r1": 2, "r2": 0, "r3": 0}, imbalance=2)[0] == "r1"  # within 2
    choice, ranks = route(FILE[:3200], index, {"r1": 3, "r2": 1, "r3": 0}, imbalance=2)
    assert choice != "r1" and ranks[-1][-1] == "r1"  # the overloaded replica comes last


def test_a_short_match_is_not_affinity():
    index = PrefixIndex()
    header = FILE[:BLOCK * 2]  # a shared header, 128 characters of a long, different file
    index.record(key(header), "r3")
    text = header + "y" * 10_000
    assert index.match(key(text), REPLICAS) == ("r3", 128)
    choice, _ = route(text, index, min_match=0.1)
    assert choice == home(text, REPLICAS)


def test_without_a_prompt_the_least_loaded_come_first():
    ranks = ranked(None, REPLICAS, {"r1": 4, "r2": 1, "r3": None}, PrefixIndex())
    assert ranks == [["r3"], ["r2", "r1"]]
    assert ranked(key("text"), [], {}, PrefixIndex()) == []


def test_the_index_is_bounded_and_forgets_a_dead_replica():
    index = PrefixIndex(max_blocks=100)
    for i in range(50):
        index.record(key(f"{i:04d}" + FILE[:BLOCK * 20]), REPLICAS[i % 3])
    assert len(index) == 100
    index.forget("r1")
    assert "r1" not in {index.match(key(f"{i:04d}" + FILE[:BLOCK * 20]), REPLICAS)[0] for i in range(50)}


def test_eviction_takes_a_prompts_end_first():
    """A prompt partly evicted still matches its start (matching walks from the first block)."""
    index = PrefixIndex(max_blocks=30)
    index.record(key(FILE[:BLOCK * 20]), "r2")
    index.record(key("other" + FILE[:BLOCK * 20]), "r3")  # 20 more blocks: 10 of the first prompt's go
    assert index.match(key(FILE[:BLOCK * 20]), REPLICAS) == ("r2", BLOCK * 10)


@pytest.mark.parametrize("path, body, text", [
    ("/infill", {"input_prefix": "def f():\n", "prompt": "    ret", "input_extra": [{"filename": "a.py", "text": "A"}]},
     "Adef f():\n    ret"),
    ("/completion", {"prompt": "import os\n"}, "import os\n"),
    ("/v1/completions", {"prompt": "import os\n", "suffix": "\n"}, "import os\n"),
    ("/api/generate", {"model": "default", "prompt": "import os\n"}, "import os\n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "hi"),
    ("/infill", "not an object", None),
    ("/health", {}, None),
])
def test_the_prompt_text_of_each_protocol(path, body, text):
    assert prompt_text(path, json.dumps(body).encode()) == text
