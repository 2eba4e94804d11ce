"""Chat with a Kimi-VL checkpoint on the command line; the reply streams as it is sampled.

    python -m kimi_vl_jax.generate --hf_dir=Kimi-VL-A3B-Instruct --image=cat.png \\
        --prompt="What is in the image?"
    python -m kimi_vl_jax.generate --orbax=WORKDIR --config=configs/joint_sft.py:tiny \\
        --image=shape.png --prompt="What shape is in the image?" --max_new_tokens=8

Weights: `--hf_dir` (an HF Kimi-VL checkpoint, `checkpoint/hf.py`) or `--orbax=WORKDIR` with the
stage `--config` that trained it (the params of the newest checkpoint, `--step` for another).
Tokenizer: `--tokenizer` = the directory or file of the Kimi `tiktoken.model`, or `tiny` / a
SentencePiece `.model` file; by default the one in `--hf_dir`, or the stage config's.

The prompt is rendered in the Kimi chat format (`data/chat.py`, Kimi-VL report section 2.4) with
the images (`--image`, repeatable) before the text of the first user turn, and a system turn:
`--system`, else "You are a helpful assistant" for HF checkpoints (the released template's
default) and the stage config's `data.default_system_prompt` for orbax runs; `--system=` gives
none. Without `--prompt` the session is interactive, multi-turn: each line is a user turn,
`/image PATH` attaches an image to the next one, `/reset` clears the history, `/exit` or EOF
quits. The history keeps each reply's answer, without its thinking.

Kimi-VL-Thinking replies start with `◁think▷ ... ◁/think▷` (`data/thinking.py`): `--thinking=show`
prints that part dimmed on a terminal (and between its markers otherwise), `--thinking=hide`
drops it. Sampling: `--temperature` (0: greedy), `--top_p`, `--top_k`, `--max_new_tokens`,
`--seed`; decoding stops at `<|im_end|>` or `[EOS]`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Sequence, TextIO

import numpy as np

HF_DEFAULT_SYSTEM = 'You are a helpful assistant'
DIM, RESET = '\x1b[2m', '\x1b[0m'


@dataclasses.dataclass
class Model:
  """What a chat session needs: model config, params, tokenizer, image settings, system prompt."""
  config: Any
  params: Any
  tokenizer: Any
  image_config: Any
  default_system: str | None


def load_tokenizer(spec: str | None, hf_dir: str | None = None, stage_cfg=None):
  """`tiny` / `sentencepiece` -> the bundled SentencePiece model; a directory or a file named
  `tiktoken.model` -> the Kimi tokenizer; another file -> a SentencePiece model. Default: the
  `tiktoken.model` in `hf_dir`, else the stage config's `tokenizer`."""
  from kimi_vl_jax.data import tokenizer as tok_lib
  if spec is None:
    if hf_dir is not None and os.path.isfile(os.path.join(hf_dir, 'tiktoken.model')):
      return tok_lib.KimiTokenizer(hf_dir)
    if stage_cfg is not None and stage_cfg.get('tokenizer') is not None:
      return tok_lib.make_tokenizer(stage_cfg.tokenizer)
    raise ValueError('no tokenizer: give --tokenizer=PATH (the Kimi tiktoken.model or its '
                     f'directory, or tiny); {hf_dir!r} holds no tiktoken.model')
  if spec.lower() in ('tiny', 'sentencepiece', 'spm'):
    return tok_lib.SentencePieceTokenizer()
  if os.path.isdir(spec) or os.path.basename(spec) == 'tiktoken.model':
    return tok_lib.KimiTokenizer(spec)
  if os.path.isfile(spec):
    return tok_lib.SentencePieceTokenizer(spec)
  raise FileNotFoundError(f'--tokenizer={spec!r}: no such file or directory')


def check_tokenizer(config, tok) -> None:
  """The tokenizer must fit the model: its ids inside the vocab, the same image placeholder."""
  if tok.vocab_size > config.text.vocab_size:
    raise ValueError(f'the tokenizer has {tok.vocab_size} ids but the model only '
                     f'{config.text.vocab_size}: wrong --tokenizer for this checkpoint')
  if tok.media_pad_id != config.media_placeholder_token_id:
    raise ValueError(f'the tokenizer\'s <|media_pad|> is {tok.media_pad_id} but the model\'s '
                     f'placeholder is {config.media_placeholder_token_id}: wrong --tokenizer')


def load_model(*, hf_dir: str | None = None, orbax: str | None = None, stage_cfg=None,
               step: int | None = None, tokenizer: str | None = None,
               system: str | None = None) -> Model:
  """Weights from `hf_dir` or an orbax run (`orbax` workdir + its `stage_cfg`)."""
  import jax
  import flax.linen as nn

  from kimi_vl_jax.data import images as images_lib
  if (hf_dir is None) == (orbax is None):
    raise ValueError('give exactly one of --hf_dir and --orbax')
  if hf_dir is not None:
    from kimi_vl_jax.checkpoint import hf
    config, params = hf.load(hf_dir)
    tok = load_tokenizer(tokenizer, hf_dir=hf_dir)
    image_config = images_lib.ImageConfig()
    default_system = HF_DEFAULT_SYSTEM
  else:
    if stage_cfg is None:
      raise ValueError('--orbax needs the --config of the stage that wrote it')
    from kimi_vl_jax.model.kimi_vl import init_params
    from kimi_vl_jax.train import checkpointing
    from kimi_vl_jax.train.init import model_config
    from kimi_vl_jax.train.stage_config import resolve_phases
    phase = resolve_phases(stage_cfg, resolve_paths=False)[-1]
    config = model_config(stage_cfg, phase['model_overrides'])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
        nn.meta.unbox(jax.eval_shape(lambda r: init_params(config, r), jax.random.PRNGKey(0))))
    params = checkpointing.restore_params(orbax, abstract, step=step)
    tok = load_tokenizer(tokenizer, stage_cfg=stage_cfg)
    data = phase['data']
    image_config = images_lib.ImageConfig.from_config(data.get('image'))
    default_system = data.get('default_system_prompt', None)
  image_config = dataclasses.replace(image_config, augment=False)
  check_tokenizer(config, tok)
  return Model(config, params, tok, image_config,
               default_system if system is None else (system or None))


def hf_pixel_values(patches: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """One image's patches in merge order [h*w, 588] -> HF `pixel_values` [h*w, 3, 14, 14],
  row-major (the inverse of the reordering in `model/vision.pack_hf_images`)."""
  from kimi_vl_jax.data import images as images_lib
  h, w = grid_hw
  perm = images_lib.merge_order_permutation(h, w)   # merge_order = row_major[perm]
  row_major = np.empty_like(patches)
  row_major[perm] = patches
  return row_major.reshape(h * w, 3, images_lib.PATCH, images_lib.PATCH)


class ChatSession:
  """A conversation: `reply(text, images, on_text)` renders the history + the new user turn,
  samples the reply (streamed to `on_text(kind, text)`, kind 'thinking' / 'answer') and keeps
  the answer in the history."""

  def __init__(self, model: Model, sampler):
    from kimi_vl_jax.data import chat
    self.model, self.sampler = model, sampler
    self.turns: list = []
    self.images: list[tuple[np.ndarray, tuple[int, int]]] = []   # every image of the history
    self._chat = chat
    self.last_tokens: np.ndarray | None = None
    self.finish_reason: str | None = None

  def reset(self) -> None:
    self.turns, self.images = [], []

  def prompt(self, text: str, image_paths: Sequence[str] = ()):
    """The `Prompt` of the history plus a user turn (images first, then the text)."""
    from kimi_vl_jax.data import images as images_lib
    from kimi_vl_jax.sampling import Prompt
    new_images = []
    for path in image_paths:
      img = images_lib.load_image(path, draft_limit=self.model.image_config.max_patches)
      patches, _, hw = images_lib.preprocess(img, self.model.image_config)
      new_images.append((hf_pixel_values(patches, hw), hw))
    parts = [('image', p) for p in image_paths] + [('text', text)]
    turns = self.turns + [self._chat.Turn('user', parts)]
    images = self.images + new_images
    ids, _ = self._chat.render_chat(
        turns, self.model.tokenizer, [images_lib.num_image_tokens(hw) for _, hw in images],
        default_system_prompt=self.model.default_system, add_generation_prompt=True)
    prompt = Prompt(input_ids=ids,
                    pixel_values=np.concatenate([p for p, _ in images]) if images else None,
                    image_grid_hws=np.asarray([hw for _, hw in images], np.int64)
                    if images else None)
    return prompt, turns, images

  def reply(self, text: str, image_paths: Sequence[str], params,
            on_text: Callable[[str, str], None]) -> tuple[str, str]:
    """Samples one reply; returns (thinking, answer) and appends the turn pair to the history."""
    from kimi_vl_jax.data.detokenize import IncrementalDetokenizer
    from kimi_vl_jax.data.thinking import ThinkingSplitter
    tok = self.model.tokenizer
    prompt, turns, images = self.prompt(text, image_paths)
    detok = IncrementalDetokenizer(tok, skip_ids=params.stop_token_ids)
    splitter = ThinkingSplitter()
    pieces = {'thinking': [], 'answer': []}

    def emit(segments):
      for kind, piece in segments:
        pieces[kind].append(piece)
        on_text(kind, piece)

    def on_token(row, token_id):
      del row  # one prompt, one sample
      emit(splitter.feed(detok.push(token_id)))

    out = self.sampler.generate([prompt], params, on_token=on_token)
    emit(splitter.feed(detok.flush()))
    emit(splitter.finish())
    self.last_tokens = out.tokens[0]
    self.finish_reason = out.finish_reasons[0]
    thinking, answer = ''.join(pieces['thinking']), ''.join(pieces['answer'])
    self.turns = turns + [self._chat.Turn('assistant', [('text', answer.strip() or ' ')])]
    self.images = images
    return thinking, answer


def stop_ids(tok) -> tuple[int, ...]:
  return (tok.im_end_id, tok.eos_id)


def make_printer(out: TextIO, thinking: str) -> Callable[[str, str], None]:
  """`on_text(kind, text)` writing to `out` at once: thinking dimmed on a terminal, between its
  markers otherwise, or dropped with `thinking='hide'`."""
  from kimi_vl_jax.data.thinking import THINK_END, THINK_START
  tty = hasattr(out, 'isatty') and out.isatty()
  state = {'in_thinking': False}

  def on_text(kind: str, text: str) -> None:
    if kind == 'thinking' and thinking == 'hide':
      return
    if (kind == 'thinking') != state['in_thinking']:
      state['in_thinking'] = kind == 'thinking'
      if tty:
        out.write(DIM if state['in_thinking'] else RESET)
      else:
        out.write(THINK_START if state['in_thinking'] else THINK_END)
    out.write(text)
    out.flush()

  def close() -> None:
    if state['in_thinking']:
      out.write(RESET if tty else THINK_END)
      state['in_thinking'] = False

  on_text.close = close  # type: ignore[attr-defined]
  return on_text


def run(args, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> ChatSession:
  """Runs the CLI with parsed flag values `args` (attributes named like the flags)."""
  from kimi_vl_jax.sampling import Sampler, SamplingParams
  if args.thinking not in ('show', 'hide'):
    raise ValueError(f'--thinking={args.thinking!r}: use show or hide')
  model = load_model(hf_dir=args.hf_dir, orbax=args.orbax, stage_cfg=args.config,
                     step=args.step, tokenizer=args.tokenizer, system=args.system)
  sampler = Sampler(model.config, model.params, max_len=args.max_len, tokenizer=model.tokenizer)
  tok = model.tokenizer
  session = ChatSession(model, sampler)

  def params_for(turn: int):
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed + turn,
                          stop_token_ids=stop_ids(tok))

  def one_turn(text: str, images: Sequence[str], turn: int) -> None:
    printer = make_printer(stdout, args.thinking)
    session.reply(text, images, params_for(turn), printer)
    printer.close()
    if session.finish_reason == 'length':
      stdout.write(f'\n[stopped after --max_new_tokens={args.max_new_tokens} tokens]')
    stdout.write('\n')
    stdout.flush()

  if args.prompt is not None:
    one_turn(args.prompt, list(args.image or ()), 0)
    return session
  pending, turn = list(args.image or ()), 0
  while True:
    stdout.write('> ')
    stdout.flush()
    line = stdin.readline()
    if not line or line.strip() == '/exit':
      break
    line = line.strip()
    if line.startswith('/image '):
      path = line[len('/image '):].strip()
      if not os.path.isfile(path):
        stdout.write(f'no such image: {path}\n')
      else:
        pending.append(path)
      continue
    if line == '/reset':
      session.reset()
      pending = []
      continue
    if not line:
      continue
    try:
      one_turn(line, pending, turn)
    except ValueError as e:            # e.g. the history outgrew --max_len: say so, keep going
      stdout.write(f'[{e}; /reset starts a new conversation]\n')
      continue
    pending, turn = [], turn + 1
  return session


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string('hf_dir', None, 'HF Kimi-VL checkpoint directory')
  flags.DEFINE_string('orbax', None, 'workdir of a training run (its newest checkpoint)')
  config_flags.DEFINE_config_file('config', None, 'stage config of the --orbax run (path[:arg])',
                                  lock_config=False)
  flags.DEFINE_integer('step', None, 'checkpoint step of --orbax (default: the newest)')
  flags.DEFINE_string('tokenizer', None, 'Kimi tiktoken.model (or its directory), tiny, or a '
                      'SentencePiece .model; default: from --hf_dir or the stage config')
  flags.DEFINE_multi_string('image', [], 'image file for the (first) user turn; repeatable')
  flags.DEFINE_string('prompt', None, 'the user message; none: interactive chat')
  flags.DEFINE_string('system', None, 'system prompt ("" for none)')
  flags.DEFINE_enum('thinking', 'show', ['show', 'hide'], 'the ◁think▷ part of a reply')
  flags.DEFINE_float('temperature', 0.0, '0 = greedy')
  flags.DEFINE_float('top_p', 1.0, 'nucleus sampling (1 = off)')
  flags.DEFINE_integer('top_k', 0, 'top-k sampling (0 = off)')
  flags.DEFINE_integer('max_new_tokens', 512, 'tokens per reply')
  flags.DEFINE_integer('max_len', 4096, 'cache length: history + reply, in tokens')
  flags.DEFINE_integer('seed', 0, 'sampling seed (turn k uses seed + k)')

  def _main(_):
    run(flags.FLAGS)

  app.run(_main, argv=argv or sys.argv)


if __name__ == '__main__':
  main()
