"""RL: Kimi-VL-Thinking (Kimi-VL report section 2.4; Kimi k1.5 section 2.3; docs/recipe.md).

Online policy mirror descent on answer-only rewards, with the length penalty, curriculum and
prioritized prompt sampling and partial rollouts (`kimi_vl_jax/rl/`). Starts from the long-CoT
SFT checkpoint; sampler and trainer share the mesh and the parameters.

  python -m kimi_vl_jax.main --config=configs/rl.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN --config.init_from=orbax:LONG_COT_RUN
  python -m kimi_vl_jax.main --config=configs/rl.py:tiny --workdir=/tmp/rl_tiny

The tiny variant starts from the tiny joint-SFT checkpoint (`init_from='demo_sft'`: the one
`configs/joint_sft.py:tiny` writes, trained on first use under the demo cache directory) and
trains on the bundled arithmetic word problems with numeric answers. `init_from='demo_long_cot'`
starts it from the tiny long-CoT SFT instead (`configs/long_cot_sft.py:tiny` continued from that
checkpoint, trained on first use), whose answers come at three lengths: the length penalty's
demo (README "RL").
"""

import ml_collections

from kimi_vl_jax.train import stage_config as sc


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('rl', arg)
  c.optim.schedule = {'kind': 'constant', 'peak_lr': 1e-6}
  c.optim.weight_decay = 0.0
  c.checkpoint.interval = 1            # iterations
  rl = dict(
      k=8, tau=0.01, baseline='mean', length_normalise=False, temperature=0.8, top_p=1.0,
      top_k=0, verifier='boxed', grad_accum=1, reset_optimizer=False, kl_to_start=True,
      skip_uniform_groups=False,
      priority_floor=0.0, prompt_limit=ml_collections.config_dict.placeholder(int),
      # k1.5: the length reward joins after a warm-up, then ramps in.
      length_penalty={'weight': 0.5, 'warmup_iterations': 20, 'ramp_iterations': 20},
      loop_penalty={'penalty': 0.5, 'min_n': 1, 'max_n': 32, 'min_repeats': 16},
      curriculum=((0, 0), (40, 1), (80, 2)), drop_solved_samples=8,
  )
  if arg == 'tiny':
    c.model = 'demo'
    c.init_from = 'demo_sft'
    c.optim.schedule = {'kind': 'constant', 'peak_lr': 6e-4}
    c.checkpoint.async_save = False
    # One optimizer step per iteration on the prompts whose 8 answers disagree (about a third
    # of 64): with normalised updates (Muon / AdamW) every step has the same size, so it pays to
    # make each one from many informative groups (README "RL": 8 prompts per step did not move
    # the held-out reward; 32 per step with the uniform groups skipped did).
    rl.update(
        prompts='demo:arithmetic/train.jsonl', heldout='demo:arithmetic/test.jsonl',
        heldout_examples=100, heldout_samples=4, eval_every=10, verifier='numeric',
        iterations=80, prompts_per_iteration=64, segment_tokens=48, max_segments=2,
        max_len=192, length_buckets=(64, 128, 192), batch_buckets=(1, 8, 64),
        groups_per_step=32, epochs=1, skip_uniform_groups=True,
        length_penalty={'weight': 0.0, 'warmup_iterations': 0, 'ramp_iterations': 0},
        loop_penalty={'penalty': 0.0, 'min_n': 1, 'max_n': 20, 'min_repeats': 8}, curriculum=(),
        drop_solved_samples=0)
    c.rl = ml_collections.ConfigDict(rl)
    return c

  c.init_from = 'orbax:{long_cot_sft_run}'  # set --config.init_from=orbax:WORKDIR
  c.model_overrides.text = {'rope_theta': 800000.0}
  rl.update(
      prompts='{data_dir}/rl/prompts.jsonl', heldout='{data_dir}/rl/heldout.jsonl',
      heldout_examples=512, heldout_samples=4, eval_every=10, iterations=200,
      prompts_per_iteration=512, segment_tokens=8192, max_segments=4, max_len=40960,
      length_buckets=(4096, 8192, 16384, 32768, 40960), batch_buckets=(64, 256, 1024),
      groups_per_step=64, epochs=2)
  c.rl = ml_collections.ConfigDict(rl)
  return c
