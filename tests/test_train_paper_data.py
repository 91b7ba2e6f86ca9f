"""``configs/paper_dsc.py`` trains end to end on a fake WikiText-103 zip with GPT-2 BPE and the
paper pipeline (shrunk model, same data path), and a resumed run continues with exactly the
next batch: its metrics equal an uninterrupted run's."""

from __future__ import annotations

import zipfile

import pytest

from dsc_jax.train.checkpointing import read_meta
from dsc_jax.train.metrics import read_metrics
from dsc_jax.train.trainer import train_and_evaluate
from tests._train_utils import load_config, without_timing
from tests.test_data_wikitext import _write_folder

pytestmark = pytest.mark.slow  # trains through the trainer

TOTAL = 6


@pytest.fixture(scope="module")
def fake_wikitext_zip(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("wikitext")
    folder, _ = _write_folder(root / "src")
    path = root / "wikitext-103-raw-v1.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"wikitext-103-raw/{file.name}")
    return str(path)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> dict[str, str]:
    return {name: str(tmp_path_factory.mktemp(name)) for name in ("tfds", "tokens", "jax_cache")}


def paper_config(zip_path: str, storage: dict[str, str], gpt2_dir: str, num_train_steps: int):
    config = load_config("paper_dsc")
    assert config.data.source == "wikitext103" and config.data.pipeline == "paper"
    assert config.data.tokenizer == "gpt2"
    config.data.wikitext_dir = zip_path
    config.data.wikitext_download = False
    config.data.gpt2_bpe_dir = gpt2_dir
    config.data.tfds_data_dir = storage["tfds"]
    config.data.cache_dir = storage["tokens"]
    config.compilation_cache_dir = storage["jax_cache"]
    # Shrink the model and the batch, keep the data path and the optimiser recipe.
    config.model.update(num_layers=1, d_model=32, num_heads=2)
    config.model.ffn.update(num_bases=16, top_k=2, hidden_dim=32)
    config.update(
        seq_len=32,
        batch_size=8,
        micro_batches=2,
        num_train_steps=num_train_steps,
        eval_every_steps=3,
        eval_batches=2,
        eval_batch_size=8,
        log_every_steps=1,
        checkpoint_every_steps=3,
    )
    config.optim.update(warmup_steps=2, decay_steps=TOTAL)
    return config


def test_paper_dsc_trains_on_fake_wikitext_and_resumes_exactly(
    fake_wikitext_zip, storage, shared_data, tmp_path
):
    gpt2_dir = str(shared_data / "gpt2")
    straight = str(tmp_path / "straight")
    result = train_and_evaluate(paper_config(fake_wikitext_zip, storage, gpt2_dir, TOTAL), straight)
    assert result["step"] == TOTAL
    records = read_metrics(straight)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    assert records[-1]["eval_loss"] < records[0]["train_loss"]  # it learns from the text

    resumed = str(tmp_path / "resumed")
    train_and_evaluate(paper_config(fake_wikitext_zip, storage, gpt2_dir, TOTAL // 2), resumed)
    assert read_meta(f"{resumed}/checkpoints", TOTAL // 2)["data_state"]["step"] == TOTAL // 2
    train_and_evaluate(paper_config(fake_wikitext_zip, storage, gpt2_dir, TOTAL), resumed)
    assert without_timing(read_metrics(resumed)) == without_timing(records)
