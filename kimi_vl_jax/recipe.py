"""The Kimi-VL recipe as one chain: every training stage in the report's order (arXiv 2504.07491
sections 2.3-2.4; docs/recipe.md), each in its own sub-workdir and initialised from the previous
stage's output.

    python -m kimi_vl_jax.recipe --tiny --workdir=/tmp/recipe       # the CPU chain, demo data
    python -m kimi_vl_jax.recipe --workdir=gs://bucket/recipe \\
        --override='*:data_dir=gs://bucket/data' --override='*:tokenizer.path=TIKTOKEN' \\
        --override=vit_pretrain:tokenizer.path=SIGLIP_DIR/spiece.model \\
        --override=vit_pretrain:init_from=siglip:SIGLIP_DIR \\
        --override='vit_align:init_from=scratch,language_model=hf:MOONLIGHT_DIR,vision_tower=orbax:{prev}'

`STAGES` is the chain: one row per stage (name, config file under `configs/`, how its key figure
is read from its `summary.json`). Stage i runs `configs/<file>:tiny` (or the full config) in
`WORKDIR/<name>` with its row's `init` (`orbax:{prev}`; ViT alignment reads MoonViT only),
`{prev}` = `WORKDIR/<name of stage i-1>`; the first stage keeps its config's own `init_from`
(from scratch in `--tiny`; the full config names a template the user fills with `--override`).

Flags:
  --stages=a,b / --from_stage=a   run part of the chain (a stage's predecessor must be finished)
  --override=STAGE:FIELD=VALUE    set a config field of one stage (`*` = every stage that has
                                  the field; refused if none has it); FIELD is
                                  dotted, list items by index (`phases.0.steps`), VALUE a Python
                                  literal or else a string; repeatable. Overrides of stages
                                  outside the selection still apply to the predecessor read to
                                  decide whether it finished, so a rerun takes the same flags

Before anything trains, the chain refuses: a stage whose config file does not exist, an override
naming an unknown stage or field, an `init_from` left as a template, a workdir the stage's
trainer cannot write (`run_stage.check_workdir`: RL needs a local one), a stage whose parameter tree
is not in its predecessor's checkpoint with the same shapes (the `orbax:` restore reads the
params by name), a predecessor outside the selection that has not finished.

Reruns: a stage whose `summary.json` says it finished (no preemption, all steps / iterations
done) is skipped; an unfinished one is resumed by its trainer from the newest checkpoint in its
sub-workdir. A stage that stops early (SIGTERM) ends the chain; the same command continues.
`WORKDIR/recipe.json` accumulates each stage's wall time over the invocations that ran it; the
summary table at the end (also `WORKDIR/recipe_table.md`) lists stage, status, key figure and
wall time.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import app, flags, logging

from kimi_vl_jax.storage import paths as storage_paths
from kimi_vl_jax.train.stage_config import CONFIGS_DIR, load_config_file


# -- key figures: read from a stage's summary.json ------------------------------------------------

def _heldout_loss(summary: dict) -> str:
  ev = summary.get('eval') or {}
  return f", held-out loss {ev['loss']:.3f}" if 'loss' in ev else ''


def final_loss(summary: dict) -> str:
  """Training loss at the first and last step (and the last held-out loss, if evaluated)."""
  if 'last_loss' not in summary:
    return 'no loss in summary.json'
  return f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}" + _heldout_loss(summary)


def answer_accuracy(summary: dict) -> str:
  """Greedy answer accuracy on `eval.answer_file` (tiny: easy-vqa test questions), else the
  losses."""
  ev = summary.get('eval') or {}
  if 'answer_accuracy' not in ev:
    return final_loss(summary)
  return (f"answer accuracy {100 * ev['answer_accuracy']:.1f}% ({ev['answer_examples']} "
          f"questions), loss {summary.get('last_loss', float('nan')):.3f}" + _heldout_loss(summary))


def zero_shot(summary: dict) -> str:
  """MoonViT pre-training: zero-shot accuracy over the class prompts and the retrieval recalls
  (`train/vit_pretrain.py`'s evaluator), else the losses."""
  ev = summary.get('eval') or {}
  if 'zero_shot_accuracy' not in ev and 'i2t_recall@1' not in ev:
    return final_loss(summary)
  parts = []
  if 'zero_shot_accuracy' in ev:
    parts.append(f"zero-shot accuracy {100 * ev['zero_shot_accuracy']:.1f}%")
  parts += [f"{d} recall@1 {100 * ev[f'{d}_recall@1']:.1f}%" for d in ('i2t', 't2i')
            if f'{d}_recall@1' in ev]
  return ', '.join(parts) + (f", loss {summary['last_loss']:.3f}" if 'last_loss' in summary
                             else '')


def heldout_change(summary: dict) -> str:
  ch = summary.get('heldout_change')
  if not ch:
    return 'no held-out change in summary.json (fewer than two held-out evaluations)'
  return ', '.join(f"{label} {ch[key]['start']:.3f} -> {ch[key]['end']:.3f} "
                   f"({ch[key]['change']:+.3f})"
                   for label, key in (('held-out mean reward', 'mean_reward'),
                                      ('greedy accuracy', 'greedy_accuracy')))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of the chain.

  tiny: fields the chain sets on the `:tiny` variant so that the stage continues its predecessor
  (the tiny configs also run alone, where some start from scratch with other choices).
  init / init_full: the stage's `init_from` in the tiny / full chain, `{prev}` standing for the
  predecessor's sub-workdir (also in an `--override` of init_from); `init_full` None = `init`.
  The first stage keeps its config's own.
  """
  name: str
  config: str
  figure: Callable[[dict], str]
  tiny: dict = dataclasses.field(default_factory=dict)
  init: str = 'orbax:{prev}'
  init_full: str | None = None


# The tiny chain trains one model throughout: `demo`, the joint-SFT demo's (so its SFT figure
# compares with the from-scratch demo); the pre-training stages alone use the smaller `tiny`.
# joint SFT and RL continue long context's RoPE base (800000) as the full configs do; alone,
# their tiny variants start from scratch (RL: from the from-scratch SFT) at the preset's base.
_DEMO = {'model': 'demo'}
_LONG_ROPE = {'model_overrides.text.rope_theta': 800000.0}

STAGES: tuple[Stage, ...] = (
    Stage('vit_pretrain', 'vit_pretrain.py', zero_shot),
    # MoonViT from ViT pre-training; the language model from Moonlight in the full recipe (the
    # user names it), from scratch in the tiny chain; the projector from scratch.
    Stage('vit_align', 'vit_align.py', final_loss, init='scratch,vision_tower=orbax:{prev}',
          init_full='scratch,language_model=hf:{moonlight_dir},vision_tower=orbax:{prev}'),
    Stage('joint_pretrain', 'joint_pretrain.py', final_loss, _DEMO),
    Stage('joint_cooldown', 'joint_cooldown.py', final_loss, _DEMO),
    Stage('long_context', 'long_context.py', final_loss, _DEMO),
    Stage('joint_sft', 'joint_sft.py', answer_accuracy, _LONG_ROPE),
    Stage('long_cot_sft', 'long_cot_sft.py', final_loss, _DEMO),
    # Half the standalone demo's iterations keep the tiny chain within its time budget.
    Stage('rl', 'rl.py', heldout_change, {**_LONG_ROPE, 'rl.iterations': 40}),
)


# -- building the chain's configs -----------------------------------------------------------------

def load_config(stage: Stage, variant: str, configs_dir: str = CONFIGS_DIR):
  path = os.path.join(configs_dir, stage.config)
  if not os.path.exists(path):
    raise FileNotFoundError(f'recipe stage {stage.name!r}: config file {path} does not exist')
  return load_config_file(path, variant, f'recipe_{stage.name}')


def parse_override(text: str) -> tuple[str, list[str], Any, str]:
  """'STAGE:FIELD=VALUE' -> (stage, field path, value, the raw VALUE text)."""
  stage, sep, rest = text.partition(':')
  field, eq, raw = rest.partition('=')
  if not (sep and eq and stage.strip() and field.strip()):
    raise ValueError(f'--override={text!r}: expected STAGE:FIELD=VALUE, e.g. '
                     'joint_sft:phases.0.steps=10')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return stage.strip(), field.strip().split('.'), value, raw


def set_field(cfg, path: list[str], value, where: str, raw: str | None = None,
              create: bool = False) -> None:
  """Sets a dotted field of a ConfigDict (list items by index). The field must exist unless
  `create`; a string field keeps the raw text (`raw`) of a value that parses as a literal."""
  node = cfg
  for i, key in enumerate(path):
    name = '.'.join(path[:i + 1])
    if isinstance(node, (list, tuple)):
      if not (key.isdigit() and int(key) < len(node)):
        raise ValueError(f'{where}: {name!r}: no item {key} in a list of {len(node)}')
      key = int(key)
    elif not hasattr(node, 'keys'):
      raise ValueError(f'{where}: {name!r}: {".".join(path[:i])!r} is not a group of fields')
    elif key not in node:
      if not create:
        raise ValueError(f'{where}: unknown field {name!r}')
      node[key] = {} if i < len(path) - 1 else value
    if i < len(path) - 1:
      node = node[key]
      continue
    old = node[key]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif isinstance(old, str) and not isinstance(value, str) and raw is not None:
      value = raw   # e.g. a path that parses as a number
    if isinstance(node, tuple):
      raise ValueError(f'{where}: {name!r} is inside a tuple; set the whole tuple')
    try:
      node[key] = value
    except TypeError as e:
      if raw is None or isinstance(value, str):
        raise ValueError(f'{where}: {e}') from None
      try:
        node[key] = raw   # a string placeholder field (None until set)
      except TypeError:
        raise ValueError(f'{where}: {e}') from None


def _has_field(cfg, path: list[str]) -> bool:
  """Whether the dotted field exists in `cfg` (a `*` override sets it in the stages that have
  it: e.g. `data.seq_len` is not a field of MoonViT pre-training's image-caption batches)."""
  node = cfg
  for key in path:
    if isinstance(node, (list, tuple)):
      if not (key.isdigit() and int(key) < len(node)):
        return False
      node = node[int(key)]
    elif hasattr(node, 'keys') and key in node:
      node = node[key]
    else:
      return False
  return True


def stage_workdir(workdir: str, stage: Stage) -> str:
  return storage_paths.join(workdir, stage.name)


def select(names: str | None = None, from_stage: str | None = None,
           stages: tuple[Stage, ...] = STAGES) -> list[int]:
  """Indices into `stages` of `--stages=a,b` or `--from_stage=a` (default: all)."""
  known = [s.name for s in stages]
  if names and from_stage:
    raise ValueError('--stages and --from_stage: give one of them')

  def index(n):
    if n not in known:
      raise ValueError(f'unknown stage {n!r}; the chain is {", ".join(known)}')
    return known.index(n)

  if names:
    return sorted({index(n.strip()) for n in names.split(',') if n.strip()})
  if from_stage:
    return list(range(index(from_stage), len(stages)))
  return list(range(len(stages)))


def build(workdir: str, tiny: bool, overrides=(), selected: list[int] | None = None,
          stages: tuple[Stage, ...] = STAGES, configs_dir: str = CONFIGS_DIR) -> dict[int, Any]:
  """{index: config} of the selected stages and of the predecessor of each, with the chain's
  `init_from` and the overrides applied. Raises on a missing config file, a bad override or an
  `init_from` template left unfilled."""
  selected = list(range(len(stages))) if selected is None else selected
  variant = 'tiny' if tiny else ''
  need = sorted(set(selected) | {i - 1 for i in selected if i > 0})
  for i in need:
    path = os.path.join(configs_dir, stages[i].config)
    if not os.path.exists(path):
      raise FileNotFoundError(f'recipe stage {stages[i].name!r}: config file {path} does not '
                              'exist')
  parsed = [(text, *parse_override(text)) for text in overrides]
  names = [s.name for s in stages]
  for text, stage, *_ in parsed:
    if stage != '*' and stage not in names:
      raise ValueError(f'--override={text!r}: unknown stage {stage!r}; the chain is '
                       f'{", ".join(names)} (or * for every stage)')
  loaded = {i: load_config(stages[i], variant, configs_dir) for i in need}
  for text, stage, path, *_ in parsed:
    if stage == '*' and not any(_has_field(c, path) for c in loaded.values()):
      raise ValueError(f'--override={text!r}: no stage has the field {".".join(path)!r}')
  out = {}
  for i in need:
    st = stages[i]
    cfg = loaded[i]
    with cfg.unlocked():
      if tiny:
        for field, value in st.tiny.items():
          set_field(cfg, field.split('.'), value, f'recipe table, stage {st.name}',
                    create=True)
      if i > 0:
        cfg.init_from = st.init if tiny or st.init_full is None else st.init_full
      for text, stage, path, value, raw in parsed:
        if stage == st.name or (stage == '*' and _has_field(cfg, path)):
          set_field(cfg, path, value, f'--override={text}', raw)
      if i > 0:
        cfg.init_from = cfg.init_from.replace('{prev}', stage_workdir(workdir, stages[i - 1]))
    if i in selected and '{' in (cfg.get('init_from') or ''):
      raise ValueError(f'stage {st.name}: init_from={cfg.init_from!r} is a template: give the '
                       f'start with --override={st.name}:init_from=params:DIR (or hf:DIR, '
                       'orbax:WORKDIR)')
    out[i] = cfg
  return out


# -- checks before anything trains ----------------------------------------------------------------

def _model_configs(cfg):
  """(first, last) model configs of a stage (phases may override the model, e.g. RoPE)."""
  from kimi_vl_jax.run_stage import LM_STAGES
  from kimi_vl_jax.train.init import model_config
  from kimi_vl_jax.train.stage_config import resolve_phases
  if cfg.stage == 'vit_pretrain':
    from kimi_vl_jax.train.vit_pretrain import vit_config
    vc = vit_config(cfg)
    return vc, vc
  if cfg.stage not in LM_STAGES:
    mc = model_config(cfg)
    return mc, mc
  phases = resolve_phases(cfg, resolve_paths=False)
  return (model_config(cfg, phases[0]['model_overrides']),
          model_config(cfg, phases[-1]['model_overrides']))


_SHAPES: dict[str, dict] = {}


def param_shapes(mc) -> dict[str, tuple]:
  """{path: shape} of a model's parameters (`jax.eval_shape`: nothing is allocated); `mc` a
  Kimi-VL config or MoonViT pre-training's `VitPretrainConfig`."""
  key = repr(mc)
  if key not in _SHAPES:
    import flax.linen as nn
    import jax
    from kimi_vl_jax.model import vit_pretrain
    from kimi_vl_jax.model.kimi_vl import init_params
    init = (vit_pretrain.init_params if isinstance(mc, vit_pretrain.VitPretrainConfig)
            else init_params)
    tree = nn.meta.unbox(jax.eval_shape(lambda r: init(mc, r), jax.random.PRNGKey(0)))
    _SHAPES[key] = {jax.tree_util.keystr(p): tuple(x.shape)
                    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return _SHAPES[key]


def check_continuity(configs: dict[int, Any], selected: list[int], workdir: str,
                     stages: tuple[Stage, ...] = STAGES) -> None:
  """Every selected stage's parameters that its `init_from` reads from its predecessor's
  checkpoint (in the chain's `workdir`) are there, same shapes (the `orbax:` init restores the
  params by name; optimizer state starts fresh): the whole tree for `orbax:PREV`, one top-level
  subtree for `BASE,SUBTREE=orbax:PREV` (vit_align reads `vision_tower` from MoonViT
  pre-training)."""
  from kimi_vl_jax.train.init import parse_init_from
  for i in selected:
    if i == 0:
      continue
    prev, cur = configs[i - 1], configs[i]
    source = 'orbax:' + stage_workdir(workdir, stages[i - 1])
    base, parts = parse_init_from(cur.init_from)
    prefixes = ([''] if base == source else []) + [f"['{sub}']" for sub, src in parts
                                                    if src == source]
    if not prefixes:
      continue
    want, have = param_shapes(_model_configs(cur)[0]), param_shapes(_model_configs(prev)[1])
    want = {k: v for k, v in want.items() if any(k.startswith(p) for p in prefixes)}
    missing = sorted(want.keys() - have.keys())
    bad = [f'{k}: {want[k]} vs {have[k]}' for k in want if k in have and want[k] != have[k]]
    if missing or bad:
      raise ValueError(f'stage {stages[i].name} cannot start from {stages[i - 1].name}\'s '
                       f'checkpoint: parameters missing there {missing[:5]}, shapes differing '
                       f'(this stage vs there) {bad[:5]}')


def expected_end(cfg) -> tuple[str, int]:
  """(summary field, value) a finished run of `cfg` reaches."""
  if cfg.stage == 'rl':
    return 'iterations', int(cfg.rl.iterations)
  from kimi_vl_jax.train.stage_config import resolve_phases
  return 'final_step', resolve_phases(cfg, resolve_paths=False)[-1]['end']


def read_summary(workdir: str) -> dict | None:
  path = storage_paths.join(workdir, 'summary.json')
  if not storage_paths.exists(path):
    return None
  return json.loads(storage_paths.read_text(path))


def finished(cfg, summary: dict | None) -> bool:
  if not summary or 'preempted_at' in summary:
    return False
  key, end = expected_end(cfg)
  return int(summary.get(key) or 0) >= end


# -- the chain ------------------------------------------------------------------------------------

def _fmt_time(s: float | None) -> str:
  if s is None:
    return '-'
  s = int(round(s))
  return f'{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s' if s >= 3600 else \
      f'{s // 60}m {s % 60:02d}s'


def table(rows: list[dict]) -> str:
  lines = ['| stage | status | key figure | wall time |', '|---|---|---|---|']
  lines += [f"| {r['stage']} | {r['status']} | {r['figure']} | {_fmt_time(r['wall_s'])} |"
            for r in rows]
  return '\n'.join(lines)


@dataclasses.dataclass
class Plan:
  """What `run_chain` runs: the selected stage indices, the configs (selected stages and their
  predecessors) and which of them have finished."""
  workdir: str
  tiny: bool
  stages: tuple[Stage, ...]
  selected: list[int]
  configs: dict[int, Any]
  done: dict[int, bool]
  configs_dir: str


def plan_chain(workdir: str, tiny: bool, overrides=(), stages_flag: str | None = None,
               from_stage: str | None = None, stages: tuple[Stage, ...] = STAGES,
               configs_dir: str = CONFIGS_DIR) -> Plan:
  """Builds and checks the chain (every refusal of the module docstring); trains nothing."""
  from kimi_vl_jax.run_stage import check_workdir
  selected = select(stages_flag, from_stage, stages)
  configs = build(workdir, tiny, overrides, selected, stages, configs_dir)
  for i in selected:
    check_workdir(configs[i], stage_workdir(workdir, stages[i]))
  check_continuity(configs, selected, workdir, stages)
  done = {i: finished(configs[i], read_summary(stage_workdir(workdir, stages[i])))
          for i in configs}
  for i in selected:
    if i > 0 and i - 1 not in selected and not done[i - 1]:
      raise ValueError(f'stage {stages[i].name} starts from {stages[i - 1].name}, which has not '
                       f'finished in {stage_workdir(workdir, stages[i - 1])}: run it first')
  return Plan(workdir, tiny, stages, selected, configs, done, configs_dir)


def run_chain(workdir: str, tiny: bool, overrides=(), stages_flag: str | None = None,
              from_stage: str | None = None, stages: tuple[Stage, ...] = STAGES,
              configs_dir: str = CONFIGS_DIR, plan: Plan | None = None) -> list[dict]:
  """Runs the selected stages in order (see the module docstring); returns the table rows."""
  from kimi_vl_jax.run_stage import run_and_record
  if plan is None:
    plan = plan_chain(workdir, tiny, overrides, stages_flag, from_stage, stages, configs_dir)
  workdir, tiny, stages, configs_dir = plan.workdir, plan.tiny, plan.stages, plan.configs_dir
  selected, configs, done = plan.selected, plan.configs, plan.done
  log_path = storage_paths.join(workdir, 'recipe.json')
  wall = json.loads(storage_paths.read_text(log_path)) if storage_paths.exists(log_path) else {}
  rows = []
  for i in selected:
    st, cfg, sub = stages[i], configs[i], stage_workdir(workdir, stages[i])
    if done[i]:
      summary, status = read_summary(sub), 'finished earlier'
      print(f'[recipe] {st.name}: finished earlier in {sub}, skipped', flush=True)
    else:
      print(f'[recipe] {st.name}: {configs_dir}/{st.config}{":tiny" if tiny else ""} in {sub}, '
            f'init_from={cfg.init_from}', flush=True)
      t0 = time.time()
      summary = run_and_record(cfg, sub)
      wall[st.name] = wall.get(st.name, 0.0) + time.time() - t0
      storage_paths.write_text(log_path, json.dumps(wall, indent=2))
      status = 'resumed' if summary.get('resumed_from') is not None else 'ran'
    if 'preempted_at' in summary:
      rows.append({'stage': st.name, 'status': f"preempted at {summary['preempted_at']}",
                   'figure': '-', 'wall_s': wall.get(st.name)})
      print(f'[recipe] {st.name} stopped early; run the same command to continue', flush=True)
      break
    figure = st.figure(summary)
    print(f'[recipe] {st.name}: {figure}', flush=True)
    rows.append({'stage': st.name, 'status': status, 'figure': figure,
                 'wall_s': wall.get(st.name, summary.get('wall_time_s'))})
  text = table(rows)
  print('\n' + text, flush=True)
  storage_paths.write_text(storage_paths.join(workdir, 'recipe_table.md'), text + '\n')
  return rows


def _define_flags() -> None:
  """The command's flags, defined only when this module runs as a program: importing it (tests,
  other entry points) must not claim --workdir, which `main.py` defines too."""
  global _WORKDIR, _TINY, _STAGES, _FROM, _OVERRIDE
  _WORKDIR = flags.DEFINE_string('workdir', None, 'recipe directory: one sub-workdir per '
                                 'stage; local, s3:// or gs://')
  _TINY = flags.DEFINE_bool('tiny', False, 'the `:tiny` variants (CPU, bundled demo data)')
  _STAGES = flags.DEFINE_string('stages', None, 'comma-separated stages to run (default: all)')
  _FROM = flags.DEFINE_string('from_stage', None, 'run this stage and every later one')
  _OVERRIDE = flags.DEFINE_multi_string('override', [], 'STAGE:FIELD=VALUE (STAGE * = every '
                                        'stage), e.g. joint_sft:phases.0.steps=10')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  try:
    plan = plan_chain(_WORKDIR.value, _TINY.value, _OVERRIDE.value, _STAGES.value, _FROM.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  run_chain(_WORKDIR.value, _TINY.value, plan=plan)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
