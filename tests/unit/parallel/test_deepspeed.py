"""moe/parallel/deepspeed.py against the installed DeepSpeed: every private attribute, table and behaviour
the adapter relies on still exists and still means what its docstrings say. A DeepSpeed upgrade that
changes one fails here, by name (the multi-process behaviour itself is covered end to end by
tests/integration/test_expert_parallel.py and test_checkpoint_layouts.py)."""
import inspect

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import groups

from moe.parallel import deepspeed as ds
from tests.helpers import layer


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_the_installed_release_is_the_one_the_adapter_was_checked_against():
    installed = ".".join(deepspeed.__version__.split(".")[:2])
    assert installed == ds.TESTED, (
        f"DeepSpeed {deepspeed.__version__} is installed, moe/parallel/deepspeed.py was checked against "
        f"{ds.TESTED}: re-check each function's docstring against it (this file's tests), then update TESTED")


def test_group_tables_and_the_world_group_clone():
    for table in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                  "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        assert isinstance(getattr(groups, table), dict), table
    assert hasattr(groups, "_WORLD_GROUP")
    # preset_world_group relies on the clone being created only when none is set
    clone = _source(groups._clone_world_group)
    assert "if _WORLD_GROUP is None" in clone and "return _WORLD_GROUP" in clone
    assert "_EXPERT_PARALLEL_GROUP[group_name]" in _source(groups._get_expert_parallel_group)


def test_registered_groups_are_the_ones_deepspeed_looks_up():
    name = "ep_size_unit_test"
    ep, edp = object(), object()
    assert not ds.expert_groups_registered(name)
    try:
        ds.register_expert_groups(name, ep, [2, 3], edp, [1, 3, 5])
        assert ds.expert_groups_registered(name)
        assert ds.expert_groups(name) == (ep, [2, 3], edp, [1, 3, 5])
        assert ds.expert_parallel_group(name) is ep
        assert groups._get_expert_data_parallel_group(name) is edp
        assert groups._get_expert_parallel_group_ranks(name) == [2, 3]
    finally:
        for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                      groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            table.pop(name, None)


def test_expert_parameters_are_marked_the_way_deepspeed_reads_them():
    marked, plain = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    ds.mark_expert_param(marked, "ep_size_2")
    assert is_moe_param(marked) and ds.is_expert_param(marked) and marked.group_name == "ep_size_2"
    assert not is_moe_param(plain) and not ds.is_expert_param(plain)
    split = ds.split_moe_param_groups([{"params": [marked, plain], "weight_decay": 0.1, "name": "decay"}])
    moe_groups = [g for g in split if g.get("moe")]
    assert [g["params"] for g in moe_groups] == [[marked]] and moe_groups[0]["name"] == "ep_size_2"
    assert [g["params"] for g in split if not g.get("moe")] == [[plain]]
    assert all(g["weight_decay"] == 0.1 for g in split)


def test_recognised_layers_are_moe_layers_to_deepspeed_and_otherwise_unchanged():
    torch.manual_seed(0)
    a, b = layer(), layer()
    x = torch.randn(2, 5, 16)
    before = a(x)
    keys = list(a.state_dict())
    ds.recognise_as_moe(a)
    ds.recognise_as_moe(b)
    cls = type(a)
    assert isinstance(a, MoE) and type(b) is cls and cls.__name__ == "DeepSpeedMoELayer"
    ds.recognise_as_moe(a)
    assert type(a) is cls  # once
    assert list(a.state_dict()) == keys
    assert torch.equal(a(x), before)
    assert a.set_deepspeed_parallelism(False) is None
    # how the engine finds MoE layers, and what it calls on them
    configure = _source(DeepSpeedEngine._configure_distributed_model)
    assert "isinstance(module, MoE)" in configure and "self.has_moe_layers = True" in configure
    assert "module.set_deepspeed_parallelism(self._config.use_data_before_expert_parallel_)" in configure
    assert "set_deepspeed_parallelism" in vars(MoE)


def test_fp32_clipping_is_looked_up_on_the_engine_instance():
    take_step = _source(DeepSpeedEngine._take_model_step)
    assert "self.clip_fp32_gradients()" in take_step
    assert "return self._global_grad_norm" in _source(DeepSpeedEngine.get_global_grad_norm)

    class Engine:
        pass

    engine = Engine()
    ds.replace_fp32_clipping(engine, lambda: torch.tensor(3.0))
    engine.clip_fp32_gradients()
    assert engine._global_grad_norm == 3.0


def test_the_backward_allreduce_switch_of_one_process(monkeypatch):
    """`enable_backward_allreduce` is what the engine's backward checks before `allreduce_gradients`, whose
    ZeRO-0 path is the bucketed flatten-reduce-copy that one process does not need."""
    assert "if self.enable_backward_allreduce and not self.inside_no_sync_ctxt:" in _source(
        DeepSpeedEngine._backward_epilogue)
    wrapped = DeepSpeedEngine.allreduce_gradients  # under DeepSpeed's NVTX decorator, which keeps no __wrapped__
    inner = [c.cell_contents for c in wrapped.__closure__ or () if inspect.isfunction(c.cell_contents)]
    assert any("self.buffered_allreduce_fallback(" in _source(f) for f in inner + [wrapped])

    class Engine:
        enable_backward_allreduce = True
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)

        def __init__(self, stage):
            self.stage = stage

        def zero_optimization_stage(self):
            return self.stage

    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # one process, as `moe train` on a laptop
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    zero0, zero1 = Engine(0), Engine(1)
    assert ds.skip_allreduce_of_one_process(zero0) and not zero0.enable_backward_allreduce
    assert not ds.skip_allreduce_of_one_process(zero1) and zero1.enable_backward_allreduce
    zero0.optimizer = type("Wrapper", (), {"set_gradient_accumulation_boundary": lambda self, b: None})()
    zero0.enable_backward_allreduce = True
    assert not ds.skip_allreduce_of_one_process(zero0) and zero0.enable_backward_allreduce
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert not ds.skip_allreduce_of_one_process(Engine(0))


def test_low_precision_wrapper_attributes():
    init, step = _source(FP16_UnfusedOptimizer.__init__), _source(FP16_UnfusedOptimizer)
    for attr in ("self.clip_grad", "self.fp16_groups", "self.fp32_groups", "self.loss_scale_config",
                 "self._global_grad_norm", "self.optimizer"):
        assert attr in init, attr
    assert "if self.clip_grad > 0." in step and "self.loss_scale_config.cur_scale" in step

    class Wrapper:
        clip_grad = 1.0
        loss_scale_config = type("Scale", (), {"cur_scale": 4.0})()

        def __init__(self, params):
            self.fp16_groups = [params]
            self.fp32_groups = [[p.detach().clone() for p in params]]
            self.optimizer = "torch optimizer"
            self.calls = 0

        def step(self):
            self.calls += 1

    params = [torch.nn.Parameter(torch.ones(2))]
    opt = Wrapper(params)
    assert ds.wraps_low_precision(opt) and not ds.wraps_low_precision(torch.optim.SGD(params, lr=1.0))
    seen = []
    ds.replace_low_precision_clipping(opt, lambda ps, scale: seen.append((ps, scale)) or torch.tensor(2.0))
    opt.step()
    assert opt.clip_grad == 0.0 and opt.calls == 1 and opt._global_grad_norm == 2.0
    assert seen == [(params, 4.0)]
    wrapping = ds.optimizer_wrapping(opt)
    assert wrapping.kind == "wrapped" and wrapping.inner == "torch optimizer"
    assert wrapping.master[id(params[0])] is opt.fp32_groups[0][0]


def test_optimizer_wrappings_and_the_relink_of_their_state():
    for cls, flats in ((DeepSpeedZeroOptimizer, "self.single_partition_of_fp32_groups"),
                       (BF16_Optimizer, "self.fp32_groups_flat_partition")):
        source = _source(cls)
        assert flats in source and "self.optimizer = init_optimizer" in source, cls
        lazy = _source(cls._lazy_init_hp_params_optimizer_state)
        assert "if not self._hp_optimizer_states_linked:" in lazy, cls
        assert "self._hp_optimizer_states_linked = True" in lazy, cls
    flat = torch.zeros(4)
    zero = type("Zero", (), {"single_partition_of_fp32_groups": [flat], "optimizer": "inner"})()
    wrapping = ds.optimizer_wrapping(zero)
    assert wrapping.kind == "fragments" and wrapping.inner == "inner" and wrapping.flats == [flat]
    plain = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    assert ds.optimizer_wrapping(plain).kind == "plain" and ds.optimizer_wrapping(plain).inner is plain

    class Linked:
        _hp_optimizer_states_linked = True
        relinked = 0

        def _lazy_init_hp_params_optimizer_state(self):
            if not self._hp_optimizer_states_linked:
                self.relinked += 1
                self._hp_optimizer_states_linked = True

    opt = Linked()
    ds.relink_optimizer_state(opt)
    assert opt.relinked == 1 and opt._hp_optimizer_states_linked


def test_tensor_fragment_api():
    from deepspeed import utils

    for name in ("safe_get_full_fp32_param", "safe_get_full_optimizer_state", "safe_set_full_fp32_param",
                 "safe_set_full_optimizer_state"):
        assert callable(getattr(utils, name)), name
        assert callable(getattr(ds, name)), name
    assert list(inspect.signature(utils.safe_get_full_optimizer_state).parameters)[:2] == ["param", "optim_state_key"]
    assert list(inspect.signature(utils.safe_set_full_optimizer_state).parameters)[:3] == [
        "param", "value", "optim_state_key"]


def test_the_shared_memory_allreduce_op_is_not_built():
    """DeepSpeed's comm layer asks `__compatible_ops__` before building its CPU shared-memory op; besides
    starting it, only `inference_all_reduce` uses it (through the torch.ops.deepspeed kernel it registers,
    with a torch.distributed fallback)."""
    import importlib

    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not the `torch` it imports

    assert ShareMemCommBuilder.NAME == ds.SHM_OP
    ds.skip_shared_memory_allreduce()
    assert deepspeed.ops.__compatible_ops__[ds.SHM_OP] is False
    assert ds_comm_torch.build_shm_op() is None
    users = [name for name, fn in inspect.getmembers(ds_comm_torch.TorchBackend, inspect.isfunction)
             if "shm_comm_op" in inspect.getsource(fn) or "torch.ops.deepspeed" in inspect.getsource(fn)]
    assert sorted(users) == ["__init__", "inference_all_reduce"], users
