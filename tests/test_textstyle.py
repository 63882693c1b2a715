"""rankserve.textstyle: WikiText's tokenized style as plain prose (lm-eval's detokenizer as the reference where the two
mean the same), spotting that style, and ``heal --detokenize wikitext`` reading --data through it end to end."""

from __future__ import annotations

import pytest
import torch
from test_cli import assert_one_line_error, rankserve
from test_heal import HEAL_FLAGS, dirs  # noqa: F401  (a module fixture: the tiny dense and compressed dirs)
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

import rankserve.heal as heal_mod
from rankserve.calibration import text_calibration
from rankserve.heal import HealConfig
from rankserve.textstyle import WIKITEXT_MIN_MARKS, wikitext_marks, wikitext_plain_text

# WikiText-2 style lines (made up here, not copied from the data set)
TOKENIZED = (
    " = = Early life = = \n"
    " \n"
    " The <unk> harbour , built in 1 @,@ 200 , was a well @-@ known port ( see below ) . It 's said that "
    'it was " the finest " ; others disagree : they didn \'t agree ! Why ? 3 @.@ 5 % of ships sank . \n'
)
PLAIN = (
    "== Early life ==\n"
    "\n"
    "The harbour, built in 1,200, was a well-known port (see below). It's said that "
    'it was "the finest"; others disagree: they didn\'t agree! Why? 3.5% of ships sank.\n'
)


def test_wikitext_plain_text_rules():
    assert wikitext_plain_text(TOKENIZED) == PLAIN
    assert wikitext_plain_text(PLAIN) == PLAIN  # plain prose is left alone


def test_wikitext_plain_text_agrees_with_lm_eval():
    # lm-eval's detokenizer is the reference (a rule set we did not write) wherever the two mean the same: no
    # <unk>, no "n 't", no headings (see rankserve.textstyle), and its line-edge spaces stripped as ours are
    lm_eval_wikitext = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    line = (
        " The harbour , built in 1 @,@ 200 , was a well @-@ known port ( see below ) . It 's said that it "
        'was " the finest " ; others disagree : 3 @.@ 5 km of quays ! Why ? \n'
    )
    theirs = lm_eval_wikitext.wikitext_detokenizer({"page": line}).strip()
    assert wikitext_plain_text(line).strip() == theirs


def test_wikitext_marks_spot_the_style_not_prose():
    assert wikitext_marks(TOKENIZED) == 4  # <unk>, @,@, @-@, @.@
    assert wikitext_marks(PLAIN) == 0
    # prose that merely mentions the markup stays below the threshold
    assert wikitext_marks('WikiText writes "well @-@ known" for a hyphen.') < WIKITEXT_MIN_MARKS
    assert wikitext_marks("an e-mail: me@host.org, <unknown> tags, 1@-@2") == 0


@pytest.fixture
def wiki_files(tmp_path):
    tokenized, plain = tmp_path / "valid.tokens.txt", tmp_path / "valid.plain.txt"
    tokenized.write_text("\ufeff" + TOKENIZED * 40, encoding="utf-8")  # WikiText's files start with a BOM
    plain.write_text(PLAIN * 40, encoding="utf-8")
    return str(tokenized), str(plain)


def test_detokenized_windows_are_the_plain_files_windows(wiki_files):
    tokenized, plain = wiki_files
    tok = tiny_tokenizer()
    got = text_calibration(tokenized, tok, 5, 24, seed=2, detokenize="wikitext")
    want = text_calibration(plain, tok, 5, 24, seed=2)
    assert torch.equal(got.tokens, want.tokens)
    assert got.details["detokenize"] == "wikitext" and got.source.endswith("valid.tokens.txt")
    assert not torch.equal(text_calibration(tokenized, tok, 5, 24, seed=2).tokens, want.tokens)
    with pytest.raises(ValueError, match="detokenize must be one of wikitext, got 'moses'"):
        text_calibration(tokenized, tok, 5, 24, detokenize="moses")


def test_heal_data_detokenized_and_recorded(wiki_files):
    tokenized, plain = wiki_files
    small = dict(seq_len=24, batch=2, tokens=96, pool_tokens=96, eval_rows=2, self_share=0.0)
    cfg = HealConfig(**small, data=[tokenized], detokenize="wikitext").validate()
    got = heal_mod.make_heal_data(tiny_model(), tiny_tokenizer(), cfg)
    want = heal_mod.make_heal_data(tiny_model(), tiny_tokenizer(), HealConfig(**small, data=[plain]))
    assert torch.equal(got.train, want.train) and torch.equal(got.held, want.held)
    assert got.sources[0]["detokenize"] == "wikitext" and "detokenize" not in want.sources[0]
    with pytest.raises(ValueError, match="heal detokenize must be one of wikitext"):
        HealConfig(**small, data=[tokenized], detokenize="moses").validate()
    with pytest.raises(ValueError, match="heal detokenize rewrites the data files"):
        HealConfig(detokenize="wikitext").validate()  # self-generated rows only: nothing to rewrite


def test_cli_heal_detokenize_and_the_style_note(dirs, wiki_files):  # noqa: F811
    root, dense, comp = dirs
    tokenized, plain = wiki_files
    base = ["heal", comp, "--teacher", dense, *HEAL_FLAGS, "--no-progress", "--json", "--self-share", "0"]
    r = rankserve(*base, "--out", str(root / "tok"), "--data", tokenized)
    assert r.returncode == 0, r.stderr
    assert "is in WikiText's tokenized style" in r.stderr and "--detokenize wikitext" in r.stderr
    r = rankserve(*base, "--out", str(root / "detok"), "--data", tokenized, "--detokenize", "wikitext")
    assert r.returncode == 0, r.stderr
    assert "tokenized style" not in r.stderr
    assert '"detokenize": "wikitext"' in r.stdout
    r = rankserve(*base, "--out", str(root / "plain"), "--data", plain)
    assert r.returncode == 0 and "tokenized style" not in r.stderr
    r = rankserve(*base, "--out", str(root / "bad"), "--data", tokenized, "--detokenize", "moses")
    assert r.returncode == 2 and "invalid choice: 'moses'" in r.stderr
    assert_one_line_error(
        rankserve("heal", comp, "--teacher", dense, "--out", str(root / "x"), "--detokenize", "wikitext"),
        "heal detokenize rewrites the data files",
    )


def test_compress_heal_detokenize_in_one_step(dirs, wiki_files):  # noqa: F811
    from rankserve.checkpoint import read_manifest

    root, dense, _ = dirs
    tokenized, _ = wiki_files
    out = str(root / "one-step-plain")
    r = rankserve(
        "compress", dense, "--family", "svd", "--ratio", "0.5", "--out", out, "--heal-tokens", "128",
        "--heal-seq-len", "32", "--heal-batch", "2", "--heal-data", tokenized, "--heal-detokenize", "wikitext",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tokenized style" not in r.stderr
    data = read_manifest(out)["healing"]["data"]
    assert [d.get("detokenize") for d in data] == [None, "wikitext"]  # self-generated rows, then the file
