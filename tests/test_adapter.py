"""save_adapter / load_adapter: everything is checked before anything is loaded, errors name the file and the
field or tensor, saving is atomic, and under torch.distributed every rank saves collectively (two gloo
processes on CPU)."""

import contextlib
import copy
import datetime
import json
import os
import pathlib
import re
import shutil
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

try:
    import resource
except ImportError:  # not on Windows
    resource = None

pytest.importorskip("transformers")

from test_model import batch, make_model, perturb_lora_b, train_steps  # noqa: E402

from sparsedoctor_kernels.model import load_adapter, save_adapter  # noqa: E402

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LAST_MODULE = "model.layers.1.mlp.down_proj"  # the last adapted module: its tensors are copied last
QUEUE_BUFFERS = ("keys", "ptr", "size")
# Upper bounds that only a hang reaches (a step takes seconds): they turn a deadlock into a failure.
COLLECTIVE_TIMEOUT_S = 300
HANG_TIMEOUT_S = 600


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every adapter parameter and queue buffer, plus the staged rows, cloned."""
    state = {}
    for name, module in model.adapted_modules().items():
        for key in ("router", "lora_a", "lora_b", "head.weight", "head.bias"):
            state[f"{name}.{key}"] = module.get_parameter(key).detach().clone()
        for key in QUEUE_BUFFERS:
            state[f"{name}.queue.{key}"] = getattr(module.queue, key).clone()
        for index, (keys, experts) in enumerate(module._staged):
            state[f"{name}.staged.{index}"] = torch.cat([keys, experts[:, None].to(keys.dtype)], 1).clone()
    return state


def assert_bit_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> pathlib.Path:
    """An adapter with trained weights and filled queues (trained once; each test edits a copy)."""
    model = make_model()
    train_steps(model, 2)
    return save_adapter(model, tmp_path_factory.mktemp("trained") / "adapter")


@pytest.fixture
def saved(trained_adapter, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained_adapter, tmp_path / "adapter"))


@pytest.fixture(scope="module")
def trained_target():
    model = make_model(seed=1)
    perturb_lora_b(model, seed=2)
    train_steps(model, 2, seed=3)
    return model


@pytest.fixture
def target(trained_target):
    """A different model to load into, with filled queues and staged rows of its own."""
    model = copy.deepcopy(trained_target)
    assert all(m._staged for m in model.adapted_modules().values())
    return model


def rewrite_config(directory: pathlib.Path, edit) -> pathlib.Path:
    path = directory / CONFIG
    config = json.loads(path.read_text())
    edited = edit(config)
    path.write_text(json.dumps(config if edited is None else edited))
    return path


def rewrite_weights(directory: pathlib.Path, edit) -> pathlib.Path:
    path = directory / WEIGHTS
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def assert_load_fails_untouched(model, directory, path, message):
    """load_adapter raises a ValueError naming `path` and `message`, and leaves the model bit-identical."""
    before = adapter_state(model)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        load_adapter(model, directory)
    assert_bit_identical(adapter_state(model), before)


def test_a_late_bad_tensor_leaves_the_model_untouched(saved, target):
    """The last module's lora_b has the wrong shape: nothing of the earlier modules may have been copied."""
    path = rewrite_weights(saved, lambda t: t.update({f"{LAST_MODULE}.lora_b": torch.zeros(4, 64, 3)}))
    assert_load_fails_untouched(target, saved, path, re.escape(f"tensor {LAST_MODULE}.lora_b: shape [4, 64, 3]"))


def _drop(key):
    return lambda tensors: tensors.pop(key)


def _set(key, value):
    return lambda tensors: tensors.update({key: value})


@pytest.mark.parametrize("edit, message", [
    (_drop(f"{LAST_MODULE}.queue.size"), re.escape(f"missing: ['{LAST_MODULE}.queue.size']")),
    (_set("model.layers.9.mlp.up_proj.router", torch.zeros(1)), "unexpected: .*layers.9"),
    (_set(f"{LAST_MODULE}.queue.ptr", torch.zeros(4)), "queue.ptr: dtype torch.float32 cannot be loaded"),
    (_set(f"{LAST_MODULE}.lora_a", torch.zeros(4, 4, 144, dtype=torch.int32)), "lora_a: dtype torch.int32"),
    (_set(f"{LAST_MODULE}.queue.ptr", torch.tensor([0, 1, 2, 32])), re.escape("queue.ptr: values [0, 1, 2, 32]")),
    (_set(f"{LAST_MODULE}.queue.size", torch.tensor([0, 1, -1, 3])), "queue.size: values"),
])
def test_bad_tensors_are_named_and_load_nothing(saved, target, edit, message):
    path = rewrite_weights(saved, edit)
    assert_load_fails_untouched(target, saved, path, message)


def test_a_truncated_safetensors_file_is_a_value_error_naming_it(saved, target):
    path = saved / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    assert_load_fails_untouched(target, saved, path, "not a readable safetensors file")


def _pop(*keys):
    def edit(config):
        for key in keys[:-1]:
            config = config[key]
        config.pop(keys[-1])
    return edit


def _put(*keys, value):
    def edit(config):
        for key in keys[:-1]:
            config = config[key]
        config[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_pop("modules"), re.escape("missing fields ['modules']")),
    (_pop("sparsedoctor"), re.escape("missing fields ['sparsedoctor']")),
    (_put("adapter_kind", value="lora"), re.escape("unknown fields ['adapter_kind']")),
    (_pop("format_version"), "field 'format_version' must be an integer"),
    (_put("format_version", value="1"), "field 'format_version' must be an integer"),
    (_put("format_version", value=2), "format_version 2 \\(written by a newer version"),
    (_put("sparsedoctor", value=[4, 2]), "field 'sparsedoctor' must be an object"),
    (_put("modules", value=None), "field 'modules' must be an object"),
    (_put("base_model", value="qwen3"), "field 'base_model' must be an object"),
    (_pop("sparsedoctor", "r"), re.escape("field 'sparsedoctor' lacks ['r']")),
    (_put("sparsedoctor", "expert_jitter", value=0.1), re.escape("unknown SparseDoctorConfig fields ['expert_jitter']")
     + " \\(written by a newer version"),
    (_put("sparsedoctor", "lora_dropout", value="0.05"), "SparseDoctorConfig.lora_dropout must be a finite number"),
    (_put("sparsedoctor", "top_k", value=9), "SparseDoctorConfig.top_k \\(9\\) must be <= num_experts"),
    (_put("sparsedoctor", "lora_alpha", value=9.0), "does not match the model's: lora_alpha: adapter 9.0 vs model 8"),
    (_put("modules", "model.layers.0.mlp.up_proj", value=[64]), "modules\\['model.layers.0.mlp.up_proj'\\] must be"),
    (_put("modules", "model.layers.0.mlp.up_proj", value=[64, 7]), "other sizes: \\['model.layers.0.mlp.up_proj'\\]"),
    (_pop("modules", LAST_MODULE), re.escape(f"only in the model: ['{LAST_MODULE}']")),
    (lambda config: [config], "the top level must be a JSON object, got list"),
])
def test_bad_config_fields_are_named_and_load_nothing(saved, target, edit, message):
    path = rewrite_config(saved, edit)
    assert_load_fails_untouched(target, saved, path, message)


@pytest.mark.parametrize("content, message", [
    (b'{"format_version": 1, ', "not valid JSON \\(Expecting"),
    ('{"format_version": 1, "note": "caf\u00e9"}'.encode("latin-1"), "not UTF-8 text"),
])
def test_unparsable_config_files_are_named(saved, target, content, message):
    (saved / CONFIG).write_bytes(content)
    assert_load_fails_untouched(target, saved, saved / CONFIG, message)


def test_a_good_load_replaces_everything_and_drops_the_staged_rows(saved, target):
    """Rows staged before the load were computed by the replaced weights: they must not reach the queues."""
    fresh = make_model()
    load_adapter(fresh, saved)
    load_adapter(target, saved)
    assert all(not m._staged for m in target.adapted_modules().values())
    assert_bit_identical(adapter_state(target), adapter_state(fresh))
    target.commit_queues()
    assert_bit_identical(adapter_state(target), adapter_state(fresh))


def test_an_adapter_loads_into_a_model_cast_to_bfloat16(saved):
    fresh, cast = make_model(), make_model().to(torch.bfloat16)
    load_adapter(fresh, saved)
    load_adapter(cast, saved)
    for name, module in cast.adapted_modules().items():
        reference = fresh.adapted_modules()[name]
        assert module.lora_b.dtype == module.queue.keys.dtype == torch.bfloat16
        assert torch.equal(module.lora_b, reference.lora_b.to(torch.bfloat16))
        assert torch.equal(module.queue.ptr, reference.queue.ptr)


def directory_bytes(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def siblings(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


def crash_writing_the_config(monkeypatch):
    """A crash after the weights were written and before the config was."""
    def crash(self, *args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(pathlib.Path, "write_text", crash)


def test_a_crash_mid_save_keeps_the_previous_adapter(saved, monkeypatch):
    before = directory_bytes(saved)
    model = make_model(seed=1)
    train_steps(model, 1)
    crash_writing_the_config(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, saved)
    monkeypatch.undo()
    assert directory_bytes(saved) == before  # the old adapter, whole, and nothing of the new one
    assert siblings(saved) == ["adapter"]  # no temporary directory left behind
    load_adapter(make_model(), saved)


def test_a_crash_mid_first_save_leaves_no_adapter(tmp_path, monkeypatch):
    crash_writing_the_config(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(make_model(), tmp_path / "adapter")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_saving_over_an_adapter_replaces_it_whole(saved):
    model = make_model(seed=1)
    train_steps(model, 1, seed=4)
    save_adapter(model, saved)
    assert siblings(saved) == ["adapter"] and sorted(directory_bytes(saved)) == [CONFIG, WEIGHTS]
    loaded = make_model()
    load_adapter(loaded, saved)
    model.commit_queues()  # what save_adapter committed
    assert_bit_identical(adapter_state(loaded), adapter_state(model))


def test_saving_refuses_to_replace_a_directory_with_other_files(saved):
    (saved / "notes.txt").write_text("keep me")
    before = directory_bytes(saved)
    with pytest.raises(ValueError, match=re.escape(f"{saved}: saving replaces the whole directory") + ".*notes.txt"):
        save_adapter(make_model(), saved)
    assert directory_bytes(saved) == before


# ---------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queues(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(m.queue, key).clone()
            for name, m in model.adapted_modules().items() for key in QUEUE_BUFFERS}


@contextlib.contextmanager
def _no_file_writes():
    """This process cannot write a byte to any file (like a rank whose node lacks the shared disk); sockets,
    and so the collectives, still work. Python ignores SIGXFSZ, so a write raises OSError instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _save_worker(rank: int, world: int, port: int, directory: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        model = make_model(num_layers=1)
        perturb_lora_b(model, seed=1 + rank)  # the ranks differ, so the file shows whose weights it holds
        model.train()
        model(**batch(seed=rank))  # stages views
        model(**batch(seed=10 + rank))  # gathers them into every rank's queue and stages new ones
        assert all(m._staged for m in model.adapted_modules().values())
        # No commit_queues first: save_adapter commits collectively. Only rank 0 may write.
        try:
            with _no_file_writes() if rank else contextlib.nullcontext():
                returned = save_adapter(model, directory)
        except (ValueError, RuntimeError) as error:  # reported: a test checks what each rank was told
            results[rank] = {"error": f"{type(error).__name__}: {error}"}
            return
        results[rank] = {"error": None, "returned": str(returned), "queues": _queues(model),
                         "staged": sum(len(m._staged) for m in model.adapted_modules().values()),
                         "lora_b": {n: m.lora_b.detach().clone() for n, m in model.adapted_modules().items()}}
    finally:
        dist.destroy_process_group()


def _join_or_fail(context, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"save_adapter did not return within {deadline_s} s on every rank: a collective hangs")


def save_on_two_ranks(directory: pathlib.Path) -> list[dict]:
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.start_processes(_save_worker, args=(world, _free_port(), str(directory), results),
                                     nprocs=world, join=False, start_method="spawn")
        _join_or_fail(context, HANG_TIMEOUT_S)
        return [dict(results[r]) for r in range(world)]


@pytest.mark.skipif(resource is None, reason="needs POSIX resource limits")
@pytest.mark.slow
def test_save_adapter_on_every_rank_commits_collectively_and_rank_0_writes(tmp_path):
    directory = tmp_path / "adapter"
    ranks = save_on_two_ranks(directory)
    assert [r["error"] for r in ranks] == [None, None]
    assert [r["returned"] for r in ranks] == [str(directory)] * 2
    assert [r["staged"] for r in ranks] == [0, 0]
    assert_bit_identical(ranks[1]["queues"], ranks[0]["queues"])
    assert any(int(size.sum()) > 0 for key, size in ranks[0]["queues"].items() if key.endswith(".size"))
    assert siblings(directory) == ["adapter"]
    loaded = make_model(num_layers=1)
    load_adapter(loaded, directory)
    assert_bit_identical(_queues(loaded), ranks[0]["queues"])
    for name, module in loaded.adapted_modules().items():
        assert torch.equal(module.lora_b, ranks[0]["lora_b"][name]), name
        assert not torch.equal(module.lora_b, ranks[1]["lora_b"][name]), name


@pytest.mark.skipif(resource is None, reason="needs POSIX resource limits")
@pytest.mark.slow
def test_a_failed_save_on_rank_0_is_raised_on_every_rank(tmp_path):
    """Rank 0 cannot write (the directory holds other files): the other rank is told, and nobody waits."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    errors = [r["error"] for r in save_on_two_ranks(directory)]
    assert errors[0].startswith("ValueError: ") and "replaces the whole directory" in errors[0]
    assert errors[1] == f"RuntimeError: rank 0 failed to write the adapter to {directory} (its error says why)"
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]


def test_saving_refuses_the_working_directory_and_a_peft_adapter_and_follows_a_symlink(tmp_path, monkeypatch):
    model = make_model()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the working directory or holds it"):
        save_adapter(model, ".")
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (peft / "adapter_model.safetensors").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not a sparsedoctor adapter's"):
        save_adapter(model, peft)
    assert (peft / "adapter_model.safetensors").read_bytes() == b"not ours"
    real = tmp_path / "real"
    save_adapter(model, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_adapter(model, link)
    assert link.is_symlink() and (real / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
