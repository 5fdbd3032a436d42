"""Benchmarks (make bench-*): side-by-side runs in one invocation, each in a fresh process.

A benchmark uses the package the way a user's script would: through the entry points below and
nothing else of fastclip (tests/test_bench_api.py fails on an import of any other fastclip name,
on a leading-underscore name, and on a benchmark assigning to an attribute of a task). Where a
benchmark needs something these do not offer, the package gets a documented hook (a config key,
an argument), not a reach into its internals: fit(evaluation=False) is how bench-overhead times
the training alone.

Public API for the benchmarks (module: names; a module listed here may also be imported whole):

    fastclip: PROJECT_ROOT
    fastclip.config: compose_train_config
    fastclip.errors: InputError, one_line_errors
    fastclip.train: run
    fastclip.tasks: build_task
    fastclip.tasks.protocol: TaskBase
    fastclip.loop: fit, probe_gflops
    fastclip.tracking: Tracker
    fastclip.runtime: pick_device, seed_everything, set_torch_threads, use_tf32_matmuls, compile_blocks, math_mode
    fastclip.optim: adamw_impl, param_groups, warmup_steps
    fastclip.schema.workers: loader_workers
    fastclip.models.clip: build_clip, clip_objective, boundary_loss
    fastclip.eval.efficiency: count_gflops, unpadded_gflops
    fastclip.eval.train_fit: training_top1
    fastclip.eval.bpc: collapsed
    fastclip.compression.prune: Pruner
    fastclip.compression.prune_masks: shrunk_copy
    fastclip.compression.quant: quantized_copy
    fastclip.compression.measure: eval_batch_ms, model_bytes
    fastclip.data.make_shards: folder_records, convert

Beyond these names, benchmarks rely on:
- the command line `python -m fastclip.train key=value ...` and the config keys (conf/), and the
  metric names a run returns and logs to MLflow (time/step_median_s, zeroshot/top1, ...);
- a task as fastclip.tasks.protocol.Task describes it (model, train_batches, loss -> StepOutput, close);
- a model from build_clip: forward(images, texts) -> its outputs dict (image_output, logit_scale, ...),
  the towers `visual` and `text` (outputs with embedding, tokens, segments), `image_method`;
- a webdataset task's training stream, task.data.train: set_epoch(seed, epoch, batch_size=, rank=,
  world_size=) and iterating it (bench-loader's simulated data-parallel ranks, loader_ranks);
- fit's tracker argument: a Tracker, None, or a stand-in answering log_metrics, log_artifact and flush.
"""
