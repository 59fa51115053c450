"""Report cleaning, the SentencePiece tokenizer (trained on real TCGA reports) and text towers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from slidefm.encoders.text import (
    BOS_ID,
    DEID_TOKEN,
    EOS_ID,
    PAD_ID,
    OpenClipTextTower,
    ReportTokenizer,
    SentencePieceTextTower,
    TextTowerConfig,
    clean_report,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def reports(shared_data):
    """Real TCGA reports: a training subset and unseen reports from the other file."""
    d = shared_data / "reports"
    train = pd.read_csv(d / "tcga_reports_test.csv")["text"].tolist()[:150]
    unseen = pd.read_csv(d / "tcga_reports_val.csv")["text"].tolist()[:60]
    return train, unseen


@pytest.fixture(scope="module")
def tok_path(reports, tmp_path_factory):
    return train_tokenizer(reports[0], 1200, tmp_path_factory.mktemp("tok") / "tok.model", seed=0)


@pytest.fixture(scope="module")
def cased_path(reports, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "cased.model"
    return train_tokenizer(reports[0], 1200, out, seed=0, lowercase=False)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  FINAL\tDIAGNOSIS:\n\nadenocarcinoma  ", "FINAL DIAGNOSIS: adenocarcinoma"),
        # OCR line breaks become ". " between lower-case words
        ("concurs with the presence. of malignancy", "concurs with the presence of malignancy"),
        ("B14-17. . serial sections", "B14-17 serial sections"),
        ("Negative. .Intrarenal veins", "Negative. Intrarenal veins"),
        ("Margins ..", "Margins."),
        # de-identification placeholders, merged when adjacent
        ('labeled "XXX, omentum"', f'labeled "{DEID_TOKEN}, omentum"'),
        ("(No XXX/XXX).", f"(No {DEID_TOKEN})."),
        ("seen by [REDACTED] on ***", f"seen by {DEID_TOKEN} on {DEID_TOKEN}"),
        (
            "Accession #: SP-[ID]. Hospital: [INSTITUTION]",
            f"Accession #: SP-{DEID_TOKEN}. Hospital: {DEID_TOKEN}",
        ),  # fmt: skip
        ("[FIGO] stage [IB]", "[FIGO] stage [IB]"),  # bracketed content is not a placeholder
        ("<Resident Signature> Date: (MM/DD/YYYY)", f"{DEID_TOKEN} Date: {DEID_TOKEN}"),
        # OCR noise; "~60%" (approximately) is content and kept
        ("Right|breast ~oeration", "Right breast oeration"),
        ("P53 (~60% of nuclei)", "P53 (~60% of nuclei)"),
        ("non- necrotic", "non-necrotic"),
        ("ﬁbrosis\u00a0noted", "fibrosis noted"),  # NFKC ligature and no-break space
        (float("nan"), ""),
    ],
)
def test_clean_report_examples(raw, clean):
    assert clean_report(raw) == clean


def test_clean_report_idempotent_on_real_reports(reports):
    for t in reports[0] + reports[1]:
        c = clean_report(t)
        assert clean_report(c) == c
        assert "  " not in c and c == c.strip()


def test_roundtrip_on_unseen_real_reports(cased_path, tok_path, reports):
    cased = ReportTokenizer(cased_path, context_length=64)
    lower = ReportTokenizer(tok_path, context_length=64)
    assert not cased.lowercase and lower.lowercase
    for t in reports[1] + reports[0][:20]:
        assert cased.sp.decode(cased.pieces(t)) == clean_report(t)
        want = clean_report(t).lower().replace("[deid]", DEID_TOKEN)
        assert lower.sp.decode(lower.pieces(t)) == want
    short = "Lung, LEFT upper lobe: invasive adenocarcinoma, acinar pattern (2.1 cm)."
    assert cased.decode(cased.encode(short)[0]) == clean_report(short)
    assert lower.decode(lower.encode(short)[0]) == clean_report(short).lower()
    assert lower.pieces("SMALL CELL Carcinoma") == lower.pieces("small cell carcinoma")


def test_tokenizer_is_deterministic(reports, tok_path, cased_path, tmp_path):
    again = train_tokenizer(reports[0], 1200, tmp_path / "again.model", seed=0)
    assert again.read_bytes() == tok_path.read_bytes()
    again = train_tokenizer(reports[0], 1200, tmp_path / "cased.model", seed=0, lowercase=False)
    assert again.read_bytes() == cased_path.read_bytes()


def test_fixed_length_layout_and_truncation(tok_path, reports):
    L = 32
    tok = ReportTokenizer(tok_path, context_length=L)
    long_text, short_text = reports[0][0], "small cell carcinoma"
    ids = tok.encode([long_text, short_text])
    assert ids.shape == (2, L) and ids.dtype == torch.long
    pieces = tok.pieces(long_text)
    assert len(pieces) > L
    assert ids[0].tolist() == [BOS_ID, *pieces[: L - 2], EOS_ID]  # head kept, EOS last
    p2 = tok.pieces(short_text)
    assert ids[1].tolist() == [BOS_ID, *p2, EOS_ID] + [PAD_ID] * (L - 2 - len(p2))
    assert tok.sp.piece_to_id(DEID_TOKEN) in tok.pieces(f"seen by {DEID_TOKEN}")
    assert len([p for p in tok.pieces(DEID_TOKEN) if p != tok.sp.piece_to_id("▁")]) == 1


def test_chunks_cover_the_whole_report(tok_path, reports):
    L = 40
    tok = ReportTokenizer(tok_path, context_length=L)
    texts = [reports[0][1], "short"]
    ids, owner = tok.encode_chunks(texts)
    for i, t in enumerate(texts):
        rows = ids[owner == i]
        assert (rows[:, 0] == BOS_ID).all()
        body = [x for r in rows.tolist() for x in r if x not in (BOS_ID, EOS_ID, PAD_ID)]
        assert body == tok.pieces(t)
    assert (owner == 0).sum() == -(-len(tok.pieces(texts[0])) // (L - 2))
    ids2, owner2 = tok.encode_chunks(texts, max_chunks=2)
    assert (owner2 == 0).sum() == 2


def test_missing_tokenizer_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        ReportTokenizer(tmp_path / "none.model")


def test_sentencepiece_tower_pools_at_eos(tok_path):
    torch.manual_seed(0)
    tok = ReportTokenizer(tok_path, context_length=24)
    cfg = TextTowerConfig(width=32, layers=2, heads=4, output_dim=16, context_length=24)
    tower = SentencePieceTextTower(cfg, tok.vocab_size).eval()
    ids = tok.encode(["adenocarcinoma of the lung", "papillary carcinoma"])
    out = tower(ids)
    assert out.shape == (2, 16)
    # tokens after EOS (padding) are invisible to a causal, EOS-pooled tower
    junk = ids.clone()
    eos = (ids[0] == EOS_ID).nonzero()[0, 0]
    junk[0, eos + 1 :] = 7
    assert torch.allclose(tower(junk)[0], out[0], atol=1e-6)
    # a token before EOS matters
    junk[0, 1] = 9 if ids[0, 1] != 9 else 10
    assert not torch.allclose(tower(junk)[0], out[0], atol=1e-4)


def test_open_clip_text_tower_from_local_weights(tmp_path, tiny_open_clip):
    import open_clip

    assert tiny_open_clip == "slidefm-test-tiny"
    torch.manual_seed(0)
    ref = open_clip.create_model("slidefm-test-tiny").eval()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    tcfg = TextTowerConfig(
        kind="open_clip", model_name="slidefm-test-tiny", pretrained=str(tmp_path / "w.pt")
    )
    tower = OpenClipTextTower(tcfg).eval()
    ids = open_clip.get_tokenizer("slidefm-test-tiny")(["a slide of small cell carcinoma"])
    with torch.no_grad():
        assert torch.allclose(tower(ids), ref.encode_text(ids), atol=1e-6)
    assert tower.output_dim == 16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenClipTextTower(
            TextTowerConfig(kind="open_clip", model_name="slidefm-test-tiny", pretrained="x.pt")
        )
    with pytest.raises(ValueError, match="needs text.pretrained"):
        OpenClipTextTower(TextTowerConfig(kind="open_clip", model_name="slidefm-test-tiny"))


def test_train_tokenizer_cli(tmp_path, shared_data):
    from slidefm.cli import main

    out = tmp_path / "tok.model"
    rc = main(
        [
            "train-tokenizer",
            "--reports",
            str(shared_data / "reports" / "tcga_reports_val.csv"),
            "--vocab-size",
            "800",
            "--max-reports",
            "80",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and out.is_file()
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["vocab_size"] == 800 and info["num_reports"] == 80 and info["seed"] == 0
    assert ReportTokenizer(out).vocab_size == 800


def test_report_column_defaults_to_text_then_report(tmp_path):
    """synth-cohort's reports.csv (column ``report``) trains a tokenizer without --text-column;
    ``text`` wins when both exist; neither is one clear error naming the columns."""
    import pandas as pd

    from slidefm.io.reports import read_report_texts

    only_report, both, neither = (tmp_path / f"{n}.csv" for n in ("r", "b", "n"))
    pd.DataFrame({"case_id": ["a", "b"], "report": ["Adenocarcinoma.", " "]}).to_csv(only_report)
    pd.DataFrame({"report": ["from report"], "text": ["from text"]}).to_csv(both)
    pd.DataFrame({"notes": ["x"]}).to_csv(neither)
    assert read_report_texts([str(only_report)]) == ["Adenocarcinoma."]
    assert read_report_texts([str(both)]) == ["from text"]
    assert read_report_texts([str(both)], "report") == ["from report"]
    with pytest.raises(ValueError, match=r"no column 'text' or 'report' \(columns: .*notes"):
        read_report_texts([str(neither)])
