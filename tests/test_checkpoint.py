"""Checkpointer: round trip, atomic temporary folders, corrupt/partial fallback,
incompatible trees. Toy trees, no model."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax.train.checkpointing import (
    Checkpointer,
    CheckpointWriteError,
    IncompatibleCheckpointError,
    UnreadableCheckpointsError,
    fingerprint,
    read_meta,
)


def make_tree(i: int) -> dict:
    return {
        "step": jnp.asarray(i, jnp.int32),
        "params": {"w": jnp.full((8, 4), float(i)), "b": jnp.arange(4, dtype=jnp.bfloat16) * i},
        "rng": jax.random.key_data(jax.random.key(i)),
    }


def abstract(tree: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save_steps(directory: str, steps=(1, 2, 3)) -> Checkpointer:
    ckpt = Checkpointer(directory, keep=3)
    for i in steps:
        ckpt.save(i, make_tree(i), {"step": i})
    ckpt.wait_until_finished()
    return ckpt


def assert_tree_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_keep(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, keep=2)
    for i in (1, 2, 3):
        ckpt.save(i, make_tree(i), {"step": i, "seed": 7})
    ckpt.close()
    ckpt = Checkpointer(directory, keep=2)
    assert ckpt.all_steps() == [2, 3]
    restored = ckpt.restore_latest(abstract(make_tree(0)))
    assert restored.step == 3 and restored.data_state == {"step": 3, "seed": 7}
    assert_tree_equal(restored.tree, make_tree(3))
    assert read_meta(directory, 3)["fingerprint"] == fingerprint(make_tree(3))


def test_fingerprint_sees_single_bit_and_position_changes():
    tree = make_tree(2)
    flipped = dict(tree, params=dict(tree["params"], w=tree["params"]["w"].at[3, 1].add(1e-6)))
    swapped = dict(tree, rng=tree["rng"][::-1])
    prints = {fingerprint(t) for t in (tree, flipped, swapped)}
    assert len(prints) == 3


def test_unfinished_temporary_folder_is_ignored_and_removed(tmp_path):
    """orbax writes <step>.orbax-checkpoint-tmp-* and renames it when complete: a crash
    mid-save leaves only the temporary folder, which is not a checkpoint."""
    directory = str(tmp_path / "ckpt")
    save_steps(directory, (1,)).close()
    partial = os.path.join(directory, "2.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(partial, "state"))
    ckpt = Checkpointer(directory, keep=3)
    assert ckpt.all_steps() == [1]
    assert ckpt.restore_latest(abstract(make_tree(0))).step == 1
    assert not os.path.exists(partial)


def _flip_data_bytes(directory: str, step: int) -> None:
    files = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0xFF]))


def _drop_meta(directory: str, step: int) -> None:
    os.remove(os.path.join(directory, str(step), "meta", "metadata"))


def _wrong_fingerprint(directory: str, step: int) -> None:
    """Arrays that decode fine but differ from what was saved (silent corruption)."""
    path = os.path.join(directory, str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["fingerprint"] = "0" * 64
    with open(path, "w") as f:
        json.dump(meta, f)


# orbax leaves a tensorstore callback on its closed event loop when a read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_flip_data_bytes, _drop_meta, _wrong_fingerprint])
def test_corrupt_latest_falls_back_to_previous(tmp_path, corrupt, caplog):
    directory = str(tmp_path / "ckpt")
    save_steps(directory).close()
    corrupt(directory, 3)
    ckpt = Checkpointer(directory, keep=3)
    restored = ckpt.restore_latest(abstract(make_tree(0)))
    assert restored.step == 2
    assert_tree_equal(restored.tree, make_tree(2))
    assert "corrupt or partial" in caplog.text and "/3" in caplog.text
    assert ckpt.all_steps() == [1, 2]
    assert [n.split("-")[0] for n in os.listdir(directory + ".corrupt")] == ["3"]
    ckpt.save(3, make_tree(3), {"step": 3})  # the step can be written again
    ckpt.close()
    assert Checkpointer(directory, keep=3).restore_latest(abstract(make_tree(0))).step == 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_two_corrupt_latest_fall_back_over_both(tmp_path, caplog):
    """Steps 3 and 2 corrupt (two kinds): step 1 restores, both are quarantined (one warning
    each), and both steps can be written again."""
    directory = str(tmp_path / "ckpt")
    save_steps(directory).close()
    _flip_data_bytes(directory, 3)
    _wrong_fingerprint(directory, 2)
    ckpt = Checkpointer(directory, keep=3)
    restored = ckpt.restore_latest(abstract(make_tree(0)))
    assert restored.step == 1
    assert_tree_equal(restored.tree, make_tree(1))
    warnings_logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_logged) == 2
    assert any("/3 " in w for w in warnings_logged) and any("/2 " in w for w in warnings_logged)
    assert ckpt.all_steps() == [1]
    assert sorted(n.split("-")[0] for n in os.listdir(directory + ".corrupt")) == ["2", "3"]
    for step in (2, 3):
        ckpt.save(step, make_tree(step), {"step": step})
    ckpt.close()
    restored = Checkpointer(directory, keep=3).restore_latest(abstract(make_tree(0)))
    assert restored.step == 3
    assert_tree_equal(restored.tree, make_tree(3))


def test_all_unreadable_is_refused_and_nothing_moves(tmp_path):
    """Used to return None (the trainer then started a fresh run over the old one)."""
    directory = str(tmp_path / "ckpt")
    save_steps(directory, (1, 2)).close()
    for step in (1, 2):
        _drop_meta(directory, step)
    with pytest.raises(UnreadableCheckpointsError, match=r"ckpt/2: metadata unreadable.*ckpt/1"):
        Checkpointer(directory, keep=3).restore_latest(abstract(make_tree(0)))
    assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved: a retry can succeed
    assert not os.path.exists(directory + ".corrupt")


def test_data_position_must_match_the_step(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(2, make_tree(2), {"step": 5})  # a data position of another step
    ckpt.close()
    with pytest.raises(IncompatibleCheckpointError, match=r"data_state.step=5"):
        Checkpointer(directory, keep=3).restore_latest(abstract(make_tree(0)))


def test_data_position_is_fingerprinted(tmp_path):
    directory = str(tmp_path / "ckpt")
    save_steps(directory, (1, 2)).close()
    path = os.path.join(directory, "2", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["data_state"]["seed"] = 99  # edited or bit-rotted data position
    with open(path, "w") as f:
        json.dump(meta, f)
    restored = Checkpointer(directory, keep=3).restore_latest(abstract(make_tree(0)))
    assert restored.step == 1


def test_corrupt_restore_is_quiet(tmp_path, capfd, caplog):
    """One warning line per quarantined checkpoint: no TensorStore dump, no "Event loop is
    closed" traceback, no "Sharding info not provided" warning."""
    directory = str(tmp_path / "ckpt")
    save_steps(directory, (1, 2)).close()
    _flip_data_bytes(directory, 2)
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Checkpointer(directory, keep=3).restore_latest(abstract(make_tree(0))).step == 1
        gc.collect()
    out, err = capfd.readouterr()
    assert "Event loop is closed" not in out + err
    assert not [w for w in caught if "Sharding info" in str(w.message)]
    warnings_logged = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_logged) == 1 and len(warnings_logged[0].getMessage()) < 600


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_failed_save_raises_one_error_and_does_not_hang(tmp_path):
    """The folder becomes unwritable (replaced by a file): the background save fails; the
    error surfaces as CheckpointWriteError and no orbax thread is left waiting forever."""
    import threading

    directory = str(tmp_path / "ckpt")
    ckpt = save_steps(directory, (1,))
    os.rename(directory, directory + ".moved")
    with open(directory, "w"):
        pass
    with pytest.raises(CheckpointWriteError, match="could not write"):
        ckpt.save(2, make_tree(2), {"step": 2})
        ckpt.close()
    stuck = [t for t in threading.enumerate() if "Signaling" in type(t).__name__ and t.is_alive()]
    for t in stuck:
        threading.Thread.join(t, timeout=5)  # orbax's join re-raises the save error
    assert not [t for t in stuck if t.is_alive()]


def test_other_configuration_is_an_error_not_corruption(tmp_path):
    directory = str(tmp_path / "ckpt")
    save_steps(directory, (1,)).close()
    other = make_tree(0)
    other["params"]["w"] = jnp.zeros((8, 5))
    with pytest.raises(IncompatibleCheckpointError, match="different parameter"):
        Checkpointer(directory, keep=3).restore_latest(abstract(other))
    assert os.listdir(directory) == ["1"] and not os.path.exists(directory + ".corrupt")
