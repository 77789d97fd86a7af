"""The ``deepspeed:`` section of a run config, checked against the keys this trainer
supports (a subset of DeepSpeed's own config schema).

DeepSpeed acts on keys it knows and ignores the rest; several of them write files
(``tensorboard.output_path``, ``csv_monitor.output_path``, ``flops_profiler.output_file``).
So the section is checked before DeepSpeed sees it: only the keys in :data:`SCHEMA`,
each of the declared type and range, and every path inside ``run.out_dir``. A bad
entry is one :class:`ConfigError` line naming ``deepspeed.<key>``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from regionvlp.errors import ConfigError

BOOL, NAME, PATH = ("bool",), ("name",), ("path",)
BYTES = ("int", 0, 1 << 40)  # bucket sizes, element counts: bounded so no key sizes memory without limit
COUNT = ("int", 0, 1 << 31)
OFFLOAD = {"device": ("choice", "none", "cpu"), "pin_memory": BOOL, "buffer_count": ("int", 1, 64)}
MONITOR = {"enabled": BOOL, "output_path": PATH, "job_name": NAME}  # files go to output_path/job_name

# key -> spec: a nested dict is a sub-section; a tuple is (kind, *args)
SCHEMA: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": ("int", 1, 1 << 20),
    "gradient_accumulation_steps": ("int", 1, 1 << 20),
    "gradient_clipping": ("float", 0, 1e12),
    "steps_per_print": ("int", 1, 1 << 62),
    "wall_clock_breakdown": BOOL,
    "memory_breakdown": BOOL,
    "dump_state": BOOL,
    "prescale_gradients": BOOL,
    "gradient_predivide_factor": ("float", 1e-12, 1e12),
    "communication_data_type": ("choice", "fp32", "fp16", "bf16"),
    "zero_allow_untested_optimizer": BOOL,
    "train_batch_size": ("refuse", "is derived (data.batch_size x train.grad_accum x ranks); remove it "
                         "from the deepspeed section"),
    "optimizer": ("refuse", "is not used: the optimizer and schedule come from the optim: section; remove it "
                  "from the deepspeed section"),
    "scheduler": ("refuse", "is not used: the optimizer and schedule come from the optim: section; remove it "
                  "from the deepspeed section"),
    "zero_force_ds_cpu_optimizer": BOOL,
    "fp16": {"enabled": BOOL, "auto_cast": BOOL, "loss_scale": ("float", 0, 1e30),
             "initial_scale_power": ("int", 0, 64), "loss_scale_window": ("int", 1, 1 << 31),
             "hysteresis": ("int", 1, 1 << 31), "consecutive_hysteresis": BOOL,
             "min_loss_scale": ("float", 0, 1e30)},
    "bf16": {"enabled": BOOL, "immediate_grad_update": BOOL},
    "zero_optimization": {
        "stage": ("choice", 0, 1, 2, 3), "overlap_comm": BOOL, "contiguous_gradients": BOOL,
        "reduce_scatter": BOOL, "reduce_bucket_size": BYTES, "allgather_partitions": BOOL,
        "allgather_bucket_size": BYTES, "round_robin_gradients": BOOL, "sub_group_size": BYTES,
        "stage3_max_live_parameters": BYTES, "stage3_max_reuse_distance": BYTES,
        "stage3_prefetch_bucket_size": BYTES, "stage3_param_persistence_threshold": BYTES,
        "stage3_gather_16bit_weights_on_model_save": BOOL,
        "offload_optimizer": OFFLOAD, "offload_param": OFFLOAD},
    "tensorboard": MONITOR,
    "csv_monitor": MONITOR,
    "flops_profiler": {"enabled": BOOL, "profile_step": COUNT, "module_depth": ("int", -1, 1 << 20),
                       "top_modules": COUNT, "detailed": BOOL, "output_file": PATH},
    "comms_logger": {"enabled": BOOL, "verbose": BOOL, "prof_all": BOOL, "debug": BOOL},
}


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` (relative to the working folder, links followed) lies in ``folder``."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


def _check_value(key: str, value: Any, spec: tuple, out_dir: str) -> None:
    kind, args = spec[0], spec[1:]
    shown = repr(value)[:80]
    if kind == "refuse":
        raise ConfigError(f"config key 'deepspeed.{key}' {args[0]}")
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"config key 'deepspeed.{key}' is {shown}; it must be true or false")
    if kind == "name" and (not isinstance(value, str) or not value.strip() or "/" in value or "\\" in value
                           or value in (".", "..")):
        raise ConfigError(f"config key 'deepspeed.{key}' is {shown}; it must be a plain name (no '/', not '..')")
    if kind == "choice" and (isinstance(value, bool) or value not in args):
        raise ConfigError(f"config key 'deepspeed.{key}' is {shown}; choose "
                          f"{', '.join(map(str, args[:-1]))} or {args[-1]}")
    if kind in ("int", "float"):
        number = (int,) if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or value != value \
                or not args[0] <= value <= args[1]:
            raise ConfigError(f"config key 'deepspeed.{key}' is {shown}; it must be "
                              f"{'an integer' if kind == 'int' else 'a number'} from {args[0]} to {args[1]}")
    if kind == "path" and value is not None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"config key 'deepspeed.{key}' is {shown}; it must be a path inside run.out_dir")
        if not inside(value, out_dir):
            raise ConfigError(f"config key 'deepspeed.{key}' is {shown}, outside run.out_dir ({out_dir}); "
                              f"DeepSpeed writes there: name a path inside run.out_dir")


def check_deepspeed(section: Any, out_dir: str, schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> None:
    """``section`` (plain dicts) has only known keys, each valid; paths inside ``out_dir``."""
    if not isinstance(section, Mapping):
        where = f"deepspeed.{prefix[:-1]}" if prefix else "deepspeed"
        raise ConfigError(f"config key '{where}' is {repr(section)[:80]}; it must be a mapping of keys "
                          f"(e.g. {where}.{next(iter(schema))}=...)")
    for key, value in section.items():
        spec = schema.get(str(key))
        if spec is None:
            raise ConfigError(f"unknown config key 'deepspeed.{prefix}{str(key)[:80]}' (this trainer supports: "
                              f"{', '.join(schema)})")
        if isinstance(spec, dict):
            check_deepspeed(value, out_dir, spec, f"{prefix}{key}.")
        else:
            _check_value(f"{prefix}{key}", value, spec, out_dir)
    for monitor in ("tensorboard", "csv_monitor"):
        sub = section.get(monitor) if not prefix else None
        if isinstance(sub, Mapping) and sub.get("enabled") and not sub.get("output_path"):
            raise ConfigError(f"config key 'deepspeed.{monitor}.enabled' is true without "
                              f"deepspeed.{monitor}.output_path; DeepSpeed would write in the working "
                              "folder: name a path inside run.out_dir")
