"""Checkpoints in a layout-free format: a run saved at one parallel layout (world size, expert-parallel
size, ZeRO stage) resumes at another, with the same weights, router state and optimizer moments.

Folders. One folder per step (`step_00000040`), written under a temporary name (`.tmp-step_...`) and
renamed when complete, then a `latest` pointer replaced atomically, then folders older than the new
one pruned (`checkpoint.keep_last`; a newer folder is never pruned). Every file is fsync-ed before
its rename, so a crash or power loss at any moment leaves `latest` naming a complete folder. Nothing
non-finite is ever saved: the gathered tensors are checked on every rank first.

Contents of a step folder (every tensor full-size, fp32, under its global name):

    meta.json                     format, version, the layout it was saved at (informational), the
                                  model's tensors (name, global shape, kind), tied aliases, the expert
                                  layers (num_experts, per-expert shapes), optimizer moment keys, step
    model.safetensors             every non-expert parameter (the fp32 master when the model trains in
                                  bf16) and persistent buffer (router balancing state: expert_bias,
                                  global_load), by the model's state_dict names; tied weights once
    optimizer.safetensors         the non-expert Adam moments: `exp_avg/<name>`, `exp_avg_sq/<name>`
    experts-ep{p}-of{P}.safetensors  one shard per expert-parallel rank p of the saving run: for each
                                  MoE layer and each of its experts e, `<layer>.experts.<e>.w13`,
                                  `<layer>.experts.<e>.w2` and their moments `exp_avg/<...>`, ...
    trainer.json                  the resumable TrainState (step, tokens, sampler position, RNG states,
                                  W&B id), the LR scheduler and the engine's step counters, as JSON
                                  (format 1 had a pickled `trainer.pt`; it is still read, safely)
    config.yaml, train_state.json the resolved config and a readable copy of the TrainState
    manifest.json                 size and SHA-256 of every other file, and of itself (written last)

Checkpoints are data: nothing in a folder is unpickled (trainer_state.py), loading verifies
the folder first (checksums, shapes, experts, finiteness, one step everywhere) and names the file
at fault.

Experts are stored one by one under their global expert id, so the number of shards and which rank
wrote which expert do not matter when loading: a rank at any EP size reads the experts it holds
from whatever shard has them (the shards' headers are an index). `verify` checks that every expert
of every layer is present exactly once with consistent shapes; `export` writes the EP=1 state dict
(stacked [E, ...] expert weights) as one safetensors file.

Why not DeepSpeed's checkpoints. `engine.save_checkpoint` on a model with MoE layers writes experts
through `_save_moe_checkpoint`, which expects one module per expert named
`.deepspeed_moe.experts.deepspeed_experts.N` and breaks on our stacked weights; its optimizer state
is one file per data-parallel rank (ZeRO partitions, or a full copy), bound to the world size and EP
size it was written at. Here every rank reads its parameters' full fp32 masters and moments through
DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`: an
all-reduce over the parameter's data-parallel group, which is the expert-data-parallel group for
experts) or directly from the optimizer without ZeRO; rank 0 writes the non-expert tensors and the
ranks of the first EP group (expert-data-parallel rank 0) write the expert shards. Loading writes
each rank's slice back through the same API.

Checkpoints written by earlier versions in DeepSpeed's own format (`mp_rank_00_model_states.pt`)
still load, through the engine, when expert parallelism is off, and only after every file in the
folder has passed the safe loader (tensors and plain data only), since DeepSpeed's loader unpickles.

Modules: folders.py (names, `latest`, pruning, leftovers), saving.py and loading.py (through the
engine, at any layout), optimizer_state.py (fp32 masters and moments via DeepSpeed's fragment API),
trainer_state.py (trainer.json), manifest.py (checksums), integrity.py (verifying a folder without the model, and
choosing the folder to resume from). Import from the module that defines a name: importing this package
loads nothing else, so `moe launch` can check a run folder without importing DeepSpeed.
"""
