"""The RL stage (Kimi-VL-Thinking; Kimi-VL report section 2.4, Kimi k1.5 section 2.3): online policy
mirror descent with answer-only rewards, a length penalty, curriculum and prioritized prompt
sampling and partial rollouts; sampler and trainer colocated on one mesh.

One iteration i (the policy at its start is pi_i):
1. pick `prompts_per_iteration` new prompts (`rl/prompt_selection.py`) and sample k responses each
   with the current parameters (one prefill per prompt, `sampling/`), and continue every
   unfinished response of earlier iterations (`rl/partial_rollouts.py`); each response gets at
   most `segment_tokens` new tokens per iteration;
2. score the groups whose k responses have all finished (`rl/rewards.py`, length reward
   `rl/length_penalty.py`), update the per-prompt success statistics;
3. compute pi_i's log-probs of those rollouts once (teacher-forced), then take `epochs` passes of
   optimizer steps over them in minibatches of `groups_per_step` groups (`rl/policy_step.py`,
   the train stack's Muon / AdamW); optionally reset the optimizer state first, and optionally
   skip the groups whose k rewards are all equal (`rl.skip_uniform_groups`: no signal at the
   iteration's first step, `mirror_descent.informative_groups`);
4. hand the new parameters to the sampler (device to device): they are pi_{i+1}.

Restarts: the train state and the host state (iteration, prompt statistics, the unfinished
responses) are one orbax checkpoint (`train/checkpointing.py`), written after each
`checkpoint.interval` iterations; every random choice derives from (seed, iteration), so a run
killed at any point and restarted with the same command repeats the uninterrupted run's
iterations bitwise on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels
from kimi_vl_jax.rl import length_penalty, mirror_descent, partial_rollouts, policy_step
from kimi_vl_jax.rl import prompt_selection, rewards as rewards_lib, rollouts as rollouts_lib
from kimi_vl_jax.rl.config import RLConfig
from kimi_vl_jax.rl.report import format_change, heldout_change, plot_run
from kimi_vl_jax.sampling import Sampler, SamplingParams
from kimi_vl_jax.train import checkpointing, metrics as metrics_lib, preemption
from kimi_vl_jax.train.init import StateFactory, model_config


class HostState:
  """What the host holds between iterations, checkpointed with the train state."""

  def __init__(self, num_prompts: int, rl: RLConfig):
    self.iteration = 0
    self.filtered = False
    self.stats = prompt_selection.PromptStats.zeros(num_prompts)
    self.buffer = partial_rollouts.RolloutBuffer(rl.k, rl.segment_tokens, rl.max_segments)

  def get_state(self) -> dict:
    return {'iteration': self.iteration, 'filtered': self.filtered,
            'stats': {k: v.tolist() for k, v in self.stats.state().items()},
            'buffer': self.buffer.state()}

  def set_state(self, state: dict) -> None:
    self.iteration, self.filtered = int(state['iteration']), bool(state['filtered'])
    self.stats = prompt_selection.PromptStats.from_state(state['stats'])
    self.buffer = partial_rollouts.RolloutBuffer.from_state(state['buffer'])


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


class RLTrainer:
  """Runs an RL config (`configs/rl.py`) in a workdir; see the module docstring."""

  def __init__(self, cfg, workdir: str):
    cfg = resolve_templates(cfg)
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    self.rl = RLConfig.from_config(cfg.rl)
    self.mc = model_config(cfg)
    mesh_lib.validate({'parallel': cfg.parallel, 'data': as_dict(cfg.data)}, self.mc)
    self.mesh = mesh_lib.make_mesh(cfg.parallel)
    self.rules = rules_lib.get_rules(cfg.parallel.rules)
    self.is_main = jax.process_index() == 0
    self.tok = make_tokenizer(cfg.get('tokenizer'))
    image_cfg = images_lib.ImageConfig.from_config(cfg.data.get('image'))
    image_cfg = dataclasses.replace(image_cfg, augment=False)
    system = cfg.data.get('default_system_prompt', None)
    load = functools.partial(rollouts_lib.load_prompts, tokenizer=self.tok,
                             verifier=self.rl.verifier, image_config=image_cfg,
                             system_prompt=system)
    self.prompts = load(self.rl.prompts, limit=self.rl.prompt_limit)
    self.heldout = load(self.rl.heldout, limit=self.rl.heldout_examples)
    longest = max(len(p.prompt.input_ids) for p in self.prompts + self.heldout)
    need = longest + self.rl.segment_tokens * self.rl.max_segments
    if need > self.rl.max_len:
      raise ValueError(f'rl.max_len={self.rl.max_len} < the longest prompt ({longest} tokens) + '
                       f'segment_tokens x max_segments ({self.rl.segment_tokens} x '
                       f'{self.rl.max_segments}); raise rl.max_len')
    if len(self.prompts) < self.rl.prompts_per_iteration:
      raise ValueError(f'{len(self.prompts)} prompts < rl.prompts_per_iteration='
                       f'{self.rl.prompts_per_iteration}')
    self.difficulty = np.asarray([p.difficulty for p in self.prompts])
    os.makedirs(self.workdir, exist_ok=True)

  # -- set-up ---------------------------------------------------------------------------------

  def _start(self):
    cfg, rl = self.cfg, self.rl
    self.factory = StateFactory(cfg, self.mc, self.mesh)
    if self.is_main:
      print(self.factory.optimizer_summary, flush=True)
    ck = cfg.checkpoint
    self.manager = checkpointing.make_manager(
        os.path.join(self.workdir, 'checkpoints'), interval=int(ck.interval),
        keep=ck.get('keep', 3), keep_every=0, async_save=bool(ck.get('async_save', True)))
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main,
                                           tensorboard=bool(cfg.train.get('tensorboard', True)))
    self.host = HostState(len(self.prompts), rl)
    latest = checkpointing.latest_step(self.manager)
    self.summary: dict[str, Any] = {'resumed_from': latest, 'init_from': cfg.init_from}
    start_state = self.factory.create()
    # The starting policy stays on the devices for KL(pi_i || pi_start).
    self.start_params = (jax.tree.map(jnp.copy, start_state.params) if rl.kl_to_start else None)
    if latest is None:
      state = start_state
    else:
      del start_state
      state = checkpointing.restore(self.manager, latest, self.factory.abstract, self.host)
      if self.is_main:
        print(f'resuming from {self.manager.directory} iteration {self.host.iteration}',
              flush=True)
    kernels = build_kernels(self.mc, self.mesh, self.rules)
    self.model = KimiVL(self.mc, kernels=kernels)
    bsh = rules_lib.batch_sharding(self.mesh, self.rules)
    with self._ctx():
      self.logprob_fn = jax.jit(functools.partial(policy_step.token_logprobs, self.model),
                                in_shardings=(self.factory.param_shardings, bsh))
      step = policy_step.make_policy_step(
          self.model, self.factory.tx, k=rl.k, md=rl.mirror_descent, grad_accum=rl.grad_accum,
          trainable=self.factory.trainable, lr_fn=self.factory.lr_fn)
      self.step_fn = jax.jit(step, in_shardings=(self.factory.shardings, bsh),
                             out_shardings=(self.factory.shardings, None), donate_argnums=0)
      self.reset_opt = jax.jit(self.factory.tx.init,
                               out_shardings=self.factory.shardings.opt_state)
    self.sampler = Sampler(self.mc, state.params, mesh=self.mesh, rules=self.rules,
                           max_len=rl.max_len, prompt_buckets=rl.length_buckets,
                           batch_buckets=rl.batch_buckets, tokenizer=self.tok)
    self.stop_ids = set(self.sampler.stop_ids(SamplingParams()))
    self.t_start = time.time()
    return state

  def _ctx(self):
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  # -- the run --------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    rl = self.rl
    state = self._start()
    if not self.host.filtered:
      self._drop_too_easy()
    if self.host.iteration == 0 and self.summary['resumed_from'] is None:
      self._heldout(0)
    bar = _progress(self.is_main, self.host.iteration, rl.iterations)
    with preemption.Preemption() as pre:
      while self.host.iteration < rl.iterations:
        it = self.host.iteration
        state, m = self._iteration(state, it)
        self.host.iteration = it + 1
        self.writer.write(it + 1, m, kind='rl')
        bar.update(1)
        if 'reward/answer_mean' in m:   # no group finished: nothing to report or train on
          bar.set_postfix(reward=f"{m['reward/answer_mean']:.3f}",
                          len=f"{m['length/mean']:.0f}")
        if (it + 1) % rl.eval_every == 0 or it + 1 == rl.iterations:
          res = self._heldout(it + 1)
          bar.write(f'held-out @ iteration {it + 1}: mean reward '
                    f"{res['heldout/mean_reward']:.3f}, greedy accuracy "
                    f"{res['heldout/greedy_accuracy']:.3f}")
        # SIGTERM (`train/preemption.py`): the iteration in progress finishes (its host state,
        # prompt statistics and buffer, is only consistent at the end), is saved, and the run
        # stops; the same command resumes at the next iteration.
        stop = pre.reached(it + 1) and it + 1 < rl.iterations
        checkpointing.save(self.manager, it + 1, state, self.host,
                           {'stage': self.cfg.stage, 'iteration': it + 1},
                           force=stop or it + 1 == rl.iterations)
        if stop:
          self.summary['preempted_at'] = it + 1
          msg = (f'preempted (SIGTERM): checkpoint at iteration {it + 1} of {rl.iterations}; '
                 'run the same command again to resume')
          logging.warning('%s', msg)
          if self.is_main:
            bar.write(msg)
          break
    bar.close()
    return self._finish(state)

  def _drop_too_easy(self) -> None:
    """k1.5: drop the prompts the starting model solves in all N samples."""
    n = self.rl.drop_solved_samples
    if n > 0:
      budget = self.rl.segment_tokens * self.rl.max_segments
      out = self.sampler.generate([p.prompt for p in self.prompts], [
          self._sampling(_seed(self.cfg.seed, 7, i), budget, n=n)
          for i in range(len(self.prompts))])
      solved = [self._answer_reward(self.prompts[i // n], t) > 0
                for i, t in enumerate(out.texts)]
      ids = np.repeat(np.arange(len(self.prompts)), n)
      self.host.stats.dropped = prompt_selection.solved_by_start(ids, solved, len(self.prompts),
                                                                 n)
      if self.is_main:
        print(f'dropped {int(self.host.stats.dropped.sum())} of {len(self.prompts)} prompts '
              f'the starting model solves in all {n} samples', flush=True)
    self.host.filtered = True

  def _answer_reward(self, rec: rollouts_lib.PromptRecord, text: str) -> float:
    return rewards_lib.verify(text, rec.answer, rec.verifier, options=rec.options)

  def _sampling(self, seed: int, max_new: int, greedy: bool = False, n: int = 1):
    rl = self.rl
    return SamplingParams(max_new_tokens=max_new, temperature=0.0 if greedy else rl.temperature,
                          top_k=0 if greedy else rl.top_k, top_p=1.0 if greedy else rl.top_p,
                          n=n, seed=seed)

  def _rollout(self, it: int) -> tuple[list, dict]:
    """Step 1: new groups and continuations; returns the finished groups."""
    rl, host = self.rl, self.host
    self.invalid = 0
    rng = np.random.default_rng(_seed(self.cfg.seed, 1, it))
    eligible = rl.curriculum.eligible(self.difficulty, it)
    in_flight = {g.prompt_id for g in host.buffer.groups.values()}
    eligible &= ~np.isin(np.arange(len(self.prompts)), list(in_flight))
    weights = prompt_selection.priorities(host.stats, eligible, floor=rl.priority_floor)
    chosen = prompt_selection.sample_prompts(rng, weights, rl.prompts_per_iteration)
    pending = host.buffer.pending()
    if pending:
      prompts = [rollouts_lib.continuation(self.prompts[host.buffer.groups[g].prompt_id],
                                           host.buffer.groups[g].responses[j])
                 for g, j in pending]
      # One seed per response and iteration: sample j of a prompt draws from fold_in(seed, j),
      # so prompts sharing a seed would share their random streams.
      out = self.sampler.generate(prompts, [
          self._sampling(_seed(self.cfg.seed, 2, it, g, j), rl.segment_tokens)
          for g, j in pending])
      for (g, j), toks, lps, why in zip(pending, out.tokens, out.logprobs, out.finish_reasons):
        self._extend(g, j, toks, lps, it, why)
    out = self.sampler.generate([self.prompts[i].prompt for i in chosen], [
        self._sampling(_seed(self.cfg.seed, 3, it, i), rl.segment_tokens, n=rl.k)
        for i in chosen])
    for p_idx, prompt_id in enumerate(chosen):
      g = host.buffer.add(int(prompt_id))
      for j in range(rl.k):
        r = p_idx * rl.k + j
        self._extend(g, j, out.tokens[r], out.logprobs[r], it, out.finish_reasons[r])
    live = weights[weights > 0]
    info = {'priority/eligible': float(len(live)),
            'priority/mean_weight': float(live.mean()) if len(live) else 0.0,
            'priority/chosen_mean_weight': float(weights[chosen].mean()),
            'rollout/continued': float(len(pending)), 'rollout/invalid': float(self.invalid),
            'rollout/unfinished': float(len(host.buffer.pending()))}
    return host.buffer.pop_done(), info

  def _extend(self, g: int, j: int, toks, lps, it: int, why: str) -> None:
    """A sampled media placeholder (an image slot with no image) ends the response before it:
    finish reason 'invalid', answer reward 0, counted in `rollout/invalid`."""
    bad = np.flatnonzero(np.asarray(toks) == self.mc.media_placeholder_token_id)
    if len(bad):
      q = int(bad[0])
      self.host.buffer.extend(g, j, toks[:q], lps[:q], it, stopped=False, invalid=True)
      self.invalid += 1
    else:
      self.host.buffer.extend(g, j, toks, lps, it, stopped=why == 'stop')

  def _score(self, groups, it: int):
    """Step 2: rows (record, response, reward) and per-response figures."""
    rl = self.rl
    rows, answer, correct, lengths, loops, kinds, diffs = [], [], [], [], [], [], []
    for g in groups:
      rec = self.prompts[g.prompt_id]
      for resp in g.responses:
        toks = resp.tokens[:-1] if resp.finish_reason == 'stop' else resp.tokens
        a = (0.0 if resp.finish_reason == 'invalid' else
             self._answer_reward(rec, self.tok.decode(toks)))
        answer.append(a)
        correct.append(a > 0)
        lengths.append(len(resp.tokens))
        loops.append(rl.loop_penalty.penalty > 0 and
                     rewards_lib.ends_in_loop(resp.tokens, rl.loop_penalty))
        diffs.append(rec.difficulty)
        kinds.append(rec.kind)
    answer = np.asarray(answer, np.float64)
    correct, lengths = np.asarray(correct, bool), np.asarray(lengths)
    total = answer.copy()
    if len(answer):
      total += rl.length_penalty.weight_at(it) * length_penalty.length_rewards(lengths, correct,
                                                                              rl.k)
      total -= rl.loop_penalty.penalty * np.asarray(loops, np.float64)
    r = 0
    for g in groups:
      rec = self.prompts[g.prompt_id]
      for resp in g.responses:
        rows.append((rec, resp, float(total[r])))
        r += 1
      self.host.stats.update([g.prompt_id] * rl.k, correct[r - rl.k:r])
    return rows, answer, correct, lengths, np.asarray(loops, bool), np.asarray(diffs)

  def _iteration(self, state, it: int):
    rl = self.rl
    t0 = time.time()
    groups, info = self._rollout(it)
    t1 = time.time()
    rows, answer, correct, lengths, loops, diffs = self._score(groups, it)
    m: dict[str, float] = dict(info)
    m['rollout/groups_done'] = float(len(groups))
    if rows:
      k = rl.k
      m['reward/answer_mean'] = float(answer.mean())
      m['reward/total_mean'] = float(np.mean([r for _, _, r in rows]))
      m['pass@1'] = float(correct.mean())
      m[f'pass@{k}'] = float(correct.reshape(-1, k).any(1).mean())
      m['length/mean'] = float(lengths.mean())
      m['length/p90'] = float(np.percentile(lengths, 90))
      m['loop_fraction'] = float(loops.mean())
      for d in np.unique(diffs):
        m[f'reward_by_difficulty/{int(d)}'] = float(answer[diffs == d].mean())
      state, m2 = self._update(state, rows, it)
      m.update(m2)
      self.sampler.load_params(state.params)   # pi_{i+1}
    m['time/rollout_s'] = t1 - t0
    m['time/train_s'] = time.time() - t1
    m['lr'] = float(self.factory.lr_fn(int(jax.device_get(state.step))))
    return state, m

  def _update(self, state, rows, it: int):
    """Step 3: pi_i's log-probs once, `epochs` passes of optimizer steps, then the KL figures."""
    rl, k = self.rl, self.rl.k
    out: dict[str, float] = {}
    if rl.skip_uniform_groups:
      keep = mirror_descent.informative_groups([r for _, _, r in rows], k)
      out['rollout/uniform_groups'] = float((~keep).sum())
      rows = [row for g in np.flatnonzero(keep) for row in rows[g * k:(g + 1) * k]]
      if not rows:   # no group carries signal: the policy stays pi_i
        return state, {**out, 'optimizer_steps': 0.0}
    batches, start = [], 0
    with self._ctx():
      for size in policy_step.minibatch_groups(len(rows) // k, rl.groups_per_step,
                                               rl.grad_accum):
        chunk = rows[start:start + size * k]
        start += len(chunk)
        hb = rollouts_lib.train_batch(chunk, it, size * k, rl.length_buckets, self.mc)
        b = rules_lib.shard_batch(hb, self.mesh, self.rules)
        old, ent = self.logprob_fn(state.params, b)
        b['old_logp'] = old
        batches.append((b, ent))
      if rl.reset_optimizer:
        state = state.replace(opt_state=self.reset_opt(state.params))
      losses, gnorms = [], []
      for _ in range(rl.epochs):
        for b, _ in batches:
          state, sm = self.step_fn(state, b)
          losses.append(sm['loss'])
          gnorms.append(sm['grad_norm'])
      kl_i = kl_s = ent_sum = tok = 0.0
      for b, ent in batches:
        mask = b['loss_mask']
        new, _ = self.logprob_fn(state.params, b)
        s1 = mirror_descent.kl_estimate_sums(b['old_logp'], new, mask)
        kl_i += float(s1['kl_sum'])
        tok += float(s1['tokens'])
        ent_sum += float(jnp.sum(ent * mask))
        if self.start_params is not None:
          start, _ = self.logprob_fn(self.start_params, b)
          kl_s += float(mirror_descent.kl_estimate_sums(b['old_logp'], start, mask)['kl_sum'])
    tok = max(tok, 1.0)
    out.update({'loss': float(np.mean(jax.device_get(losses))),
                'grad_norm': float(np.mean(jax.device_get(gnorms))),
                'kl/to_pi_i': kl_i / tok, 'entropy': ent_sum / tok,
                'optimizer_steps': float(len(losses))})
    if self.start_params is not None:
      out['kl/pi_i_to_start'] = kl_s / tok
    return state, out

  def _heldout(self, it: int) -> dict[str, float]:
    """Held-out prompts: greedy accuracy and the mean answer reward of sampled responses."""
    rl = self.rl
    prompts = [p.prompt for p in self.heldout]
    budget = rl.segment_tokens * rl.max_segments
    greedy = self.sampler.generate(prompts, self._sampling(0, budget, greedy=True))
    g = np.asarray([self._answer_reward(r, t) for r, t in zip(self.heldout, greedy.texts)])
    n = rl.heldout_samples
    sampled = self.sampler.generate(prompts, [
        self._sampling(_seed(self.cfg.seed, 4, it, i), budget, n=n) for i in range(len(prompts))])
    s = np.asarray([self._answer_reward(self.heldout[i // n], t)
                    for i, t in enumerate(sampled.texts)]).reshape(-1, n)
    res = {'heldout/mean_reward': float(s.mean()), 'heldout/greedy_accuracy': float(g.mean()),
           f'heldout/pass@{n}': float((s > 0).any(1).mean()),
           'heldout/length_mean': float(np.mean([len(t) for t in sampled.tokens]))}
    self.writer.write(it, res, kind='eval')
    if self.is_main:
      import json
      with open(os.path.join(self.workdir, 'heldout.jsonl'), 'a') as f:
        f.write(json.dumps({'iteration': it, 'greedy': g.tolist(),
                            'sampled_mean': s.mean(1).tolist()}) + '\n')
    self.summary.setdefault('heldout', {})[it] = res
    return res

  def _finish(self, state) -> dict[str, Any]:
    self.manager.wait_until_finished()
    self.manager.close()
    self.writer.close()
    summary = self.summary
    summary['iterations'] = self.host.iteration
    summary['wall_time_s'] = time.time() - self.t_start
    summary['counters'] = {k: int(v) for k, v in jax.device_get(state.counters).items()}
    if self.is_main:
      summary['plot'] = plot_run(self.workdir, self.host.stats)
      change = None if 'preempted_at' in summary else heldout_change(self.workdir)
      if change is not None:
        summary['heldout_change'] = change
        print(format_change(change), flush=True)
    return summary


def resolve_templates(cfg):
  """A copy of `cfg` with `{data_dir}` filled into the prompt sets and `init_from='demo_sft'` /
  `'demo_long_cot'` replaced by the tiny joint-SFT / long-CoT SFT checkpoint (trained on first
  use)."""
  import copy
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    for name in ('prompts', 'heldout'):
      path = cfg.rl.get(name) or ''
      if '{data_dir}' in path:
        if not cfg.get('data_dir'):
          raise ValueError(f'rl.{name}={path!r} needs --config.data_dir')
        cfg.rl[name] = path.replace('{data_dir}', cfg.data_dir)
    if cfg.get('init_from') == 'demo_sft':
      cfg.init_from = 'orbax:' + demo_sft_checkpoint()
    elif cfg.get('init_from') == 'demo_long_cot':
      cfg.init_from = 'orbax:' + demo_long_cot_checkpoint()
  return cfg


def _stage_config(name: str):
  """`configs/<name>.py:tiny`, read from the configs directory next to this package."""
  from kimi_vl_jax.train.stage_config import CONFIGS_DIR, load_config_file
  config_file = os.path.join(CONFIGS_DIR, f'{name}.py')
  if not os.path.exists(config_file):
    raise FileNotFoundError(f'the demo checkpoint trains configs/{name}.py:tiny, which is not '
                            'next to this package; run it yourself and pass '
                            '--config.init_from=orbax:WORKDIR')
  return load_config_file(config_file, 'tiny', f'{name}_config')


def _demo_checkpoint(workdir: str, make_cfg, what: str) -> str:
  """`workdir` once a run of `make_cfg()` has finished there (its `summary.json` without
  `preempted_at`), training it first (on from its checkpoint, if a SIGTERM stopped it)."""
  import json
  done = os.path.join(workdir, 'summary.json')
  if os.path.exists(done):
    with open(done) as f:
      if 'preempted_at' not in json.load(f):
        return workdir
    # A run stopped by SIGTERM left its summary: train on from its checkpoint.
  from kimi_vl_jax.train.loop import Trainer
  print(f'{what}: training it in {workdir} first', flush=True)
  summary = Trainer(make_cfg(), workdir).run()
  if 'preempted_at' in summary:
    raise RuntimeError(f'{what}: training {workdir} was stopped (SIGTERM) at step '
                       f"{summary['preempted_at']}; run again to resume it")
  with open(done, 'w') as f:
    json.dump(summary, f, default=str)
  return workdir


def demo_sft_checkpoint() -> str:
  """The workdir of `configs/joint_sft.py:tiny` under the demo cache (`data/build_demo.py`),
  trained there first if it holds no complete checkpoint (about 10 minutes on a 2-core CPU)."""
  from kimi_vl_jax.data.build_demo import default_cache_dir
  return _demo_checkpoint(os.path.join(default_cache_dir(), 'joint_sft_tiny'),
                          lambda: _stage_config('joint_sft'),
                          'init_from=demo_sft (configs/joint_sft.py:tiny)')


def demo_long_cot_checkpoint() -> str:
  """The workdir of `configs/long_cot_sft.py:tiny` continued from the tiny joint-SFT checkpoint
  (`demo_sft_checkpoint`: its model preset and RoPE base), under the demo cache, trained there
  first if needed (a few minutes): a policy that answers the arithmetic problems at three
  lengths (`data/build_demo.py` `worked_answer`), for the length penalty's demo."""
  from kimi_vl_jax.data.build_demo import default_cache_dir

  def make_cfg():
    sft, cfg = _stage_config('joint_sft'), _stage_config('long_cot_sft')
    with cfg.unlocked():
      cfg.init_from = 'orbax:' + demo_sft_checkpoint()
      cfg.model, cfg.model_overrides = sft.model, sft.model_overrides
    return cfg

  return _demo_checkpoint(os.path.join(default_cache_dir(), 'long_cot_sft_tiny'), make_cfg,
                          'init_from=demo_long_cot (configs/long_cot_sft.py:tiny from the tiny '
                          'joint-SFT checkpoint)')


def _progress(enabled: bool, start: int, total: int):
  import tqdm
  return tqdm.tqdm(total=total, initial=start, desc='rl', dynamic_ncols=True, mininterval=1.0,
                   disable=not enabled)
