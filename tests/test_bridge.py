"""The text bridge's fit and its use (pure numpy): a text-only listing must land on its own product's photos."""
import numpy as np
import pytest

from prodsim_spark import bridge
from prodsim_spark.errors import ModelError


def _products(rng, n_products: int, text_dim: int, image_dim: int):
    names = rng.normal(size=(n_products, text_dim))     # what each product's text says
    looks = rng.normal(size=(n_products, image_dim))    # what its photos look like
    return names, looks


def test_the_bridge_maps_a_products_text_onto_its_photos_mean_and_not_onto_another_products():
    rng = np.random.default_rng(0)
    names, looks = _products(rng, 20, 32, 16)
    # listings: several wordings of each product's text; photos: noisy views of its look
    texts = np.concatenate([names + 0.3 * rng.normal(size=names.shape) for _ in range(4)])
    groups = [f"p{i}" for i in range(20)] * 4
    photos = np.concatenate([looks + 0.5 * rng.normal(size=looks.shape) for _ in range(5)])
    labels = np.tile(np.arange(20), 5)
    means = {f"p{k}": v for k, v in bridge.prototypes(photos, labels).items()}
    weight, fit = bridge.fit(texts, groups, means, ridge=0.01)
    assert weight.shape == (33, 16) and weight.dtype == np.float32
    assert fit["listings"] == 80 and fit["groups"] == 20 and fit["fit_cosine"] > 0.9

    # a new wording of each product's text: its nearest photo mean is its own product's
    unseen = names + 0.3 * rng.normal(size=names.shape)
    predicted = bridge.apply(weight, unseen)
    assert np.allclose(np.linalg.norm(predicted, axis=1), 1, atol=1e-5)
    nearest = np.argmax(predicted @ np.stack([means[f"p{k}"] for k in range(20)]).T, axis=1)
    assert (nearest == np.arange(20)).mean() >= 0.95


def test_rows_of_groups_without_photos_are_left_out_and_too_few_rows_are_an_error():
    rng = np.random.default_rng(1)
    means = {"a": rng.normal(size=8), "b": rng.normal(size=8)}
    texts = rng.normal(size=(5, 4))
    _, fit = bridge.fit(texts, ["a", "b", "c", "c", "a"], means, ridge=0.1)
    assert fit["listings"] == 3 and fit["groups"] == 2
    with pytest.raises(ModelError, match="1 found"):
        bridge.fit(texts, ["a", "x", "y", "z", "w"], means, ridge=0.1)
