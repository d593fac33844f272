"""The torch-free text path equals open_clip's: tokens and embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from clipsearch.text_tower import BpeTokenizer, NumpyTextEncoder, load_fast_text_encoder

TEXTS = ["a dog on a beach at sunset", "Café crème, naïve façade!", "", "123 x-ray 😀 &amp;",
         " ".join(["long"] * 100), "caf&eacute; &lt;b&gt;", "cafÃ© mojibake", "tab\tand\nline",
         "  Shout  LOUD \x1b[31m red\x1b[0m\r\n"]
PLAIN_ASCII = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&") + "\t\n"


def test_tokenizer_matches_open_clip() -> None:
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")
    ours = BpeTokenizer(77)
    np.testing.assert_array_equal(ours(TEXTS), ref(TEXTS).numpy())


@given(st.text(alphabet=PLAIN_ASCII, max_size=60))
@hyp_settings(max_examples=3000, deadline=None)
def test_plain_ascii_is_left_alone_by_ftfy_and_unescape(text: str) -> None:
    """The tokenizer skips ftfy (and its import) for such text: that is only right while
    ftfy.fix_text and html.unescape return it unchanged."""
    import html

    import ftfy

    assert ftfy.fix_text(text) == text
    assert html.unescape(text) == text


def test_numpy_text_tower_matches_torch(tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    assert tiny_encoder.text_tower is not None
    fast = NumpyTextEncoder(tiny_encoder.weights_file, tiny_encoder.text_tower)
    import torch

    torch.set_num_threads(torch.get_num_threads())
    ref = tiny_encoder.encode_texts(TEXTS) if tiny_encoder.precision == "fp32" else None
    if ref is None:
        from clipsearch.encoder import load_encoder

        ref = load_encoder(tiny_encoder.info.spec, device="cpu", precision="fp32").encode_texts(TEXTS)
    got = fast.encode_texts(TEXTS)
    assert np.min(np.sum(got * ref, axis=1)) > 0.9999


def test_changed_weights_file_disables_the_fast_path(tiny_encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from clipsearch.text_tower import fast_text_record

    copy = tmp_path / "w.safetensors"
    shutil.copy(tiny_encoder.weights_file, copy)
    record = json.loads(fast_text_record(str(copy), tiny_encoder.text_tower) or "{}")
    assert load_fast_text_encoder(record) is not None
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    assert load_fast_text_encoder(record) is None


def test_cold_text_search_never_imports_torch_nor_sqlalchemy(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A text search's start-up is its latency: the numpy text tower instead of torch and
    open_clip, plain sqlite3 instead of SQLAlchemy and Alembic (~0.3 s of imports), and no
    ftfy for plain ASCII queries."""
    from clipsearch.indexer import run_index

    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    code = (
        "import sys, json\n"
        "from clipsearch.config import resolve_settings\n"
        "from clipsearch.search import search\n"
        f"resp = search(resolve_settings(db={str(settings.db_path)!r}), ['a red square'])\n"
        "heavy = {'torch', 'open_clip', 'sqlalchemy', 'alembic', 'ftfy'} & set(sys.modules)\n"
        "print(json.dumps({'n': len(resp.results), 'heavy': sorted(heavy)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == {"n": 1, "heavy": []}


@pytest.mark.slow
def test_numpy_text_tower_matches_torch_at_full_size(tmp_path: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipsearch.text_tower import describe_text_tower

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256").eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    tower = describe_text_tower(model, open_clip.get_model_config("ViT-B-32-256"))
    assert tower is not None and tower["layers"] == 12
    tok = open_clip.get_tokenizer("ViT-B-32-256")
    with torch.no_grad():
        ref = model.encode_text(tok(TEXTS), normalize=True).numpy()
    got = NumpyTextEncoder(str(path), tower).encode_texts(TEXTS)
    assert np.min(np.sum(got * ref, axis=1)) > 0.9999


class _DtypeSpy(np.ndarray):
    """An array that records the dtypes of every ufunc (matmul included) it takes part in."""

    seen: list[str] = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):  # type: ignore[no-untyped-def]
        _DtypeSpy.seen.extend(str(np.asarray(i).dtype) for i in inputs
                              if isinstance(i, np.ndarray))
        plain = [np.asarray(i) if isinstance(i, _DtypeSpy) else i for i in inputs]
        return getattr(ufunc, method)(*plain, **kwargs)


def test_numpy_text_towers_compute_in_float32(tiny_encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A float64 numpy scalar in the attention scale once promoted the whole residual stream
    to float64, converting every weight matrix on every product: 5x slower queries."""
    fast = NumpyTextEncoder(tiny_encoder.weights_file, tiny_encoder.text_tower)
    fast.w = {k: v.view(_DtypeSpy) for k, v in fast.w.items()}
    _DtypeSpy.seen = []
    out = fast.encode_texts(["a dog on a beach"])
    assert out.dtype == np.float32 and _DtypeSpy.seen
    assert set(_DtypeSpy.seen) <= {"float32", "int64"}, set(_DtypeSpy.seen)
