"""The chat CLI (`kimi_vl_jax/generate.py`) end to end on the tiny checkpoint
(tests/fixtures/kimi_vl_tiny) with the bundled tiny SentencePiece tokenizer, whose special ids
are the checkpoint's: the streamed text is the decoded `Sampler.generate` output of the rendered
prompt, multi-turn history is rendered back, an orbax run gives the same reply."""

import io
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax import generate
from kimi_vl_jax.checkpoint import hf
from kimi_vl_jax.data import chat
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.sampling import Prompt, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'kimi_vl_tiny')


def _args(**kw):
  base = dict(hf_dir=FIXTURE, orbax=None, config=None, step=None, tokenizer='tiny', image=[],
              prompt=None, system=None, thinking='show', temperature=0.0, top_p=1.0, top_k=0,
              max_new_tokens=12, max_len=256, seed=0)
  base.update(kw)
  return types.SimpleNamespace(**base)


class _Recorder(io.StringIO):
  """stdout that counts writes (streaming writes many times during one reply)."""

  def __init__(self):
    super().__init__()
    self.writes = 0

  def write(self, s):
    self.writes += 1
    return super().write(s)


@pytest.fixture(scope='module')
def image_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('img') / 'a.png'
  Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope='module')
def hf_model():
  return hf.load(FIXTURE)


def test_hf_pixel_values_invert_the_merge_order(image_path):
  img = images_lib.load_image(image_path)
  patches, coords, hw = images_lib.preprocess(img, images_lib.ImageConfig())
  pv = generate.hf_pixel_values(patches, hw)
  assert pv.shape == (hw[0] * hw[1], 3, 14, 14)
  from kimi_vl_jax.model.vision import pack_hf_images
  packed = pack_hf_images(pv, np.array([hw]))
  np.testing.assert_array_equal(packed['patches'][0], patches)
  np.testing.assert_array_equal(packed['patch_coords'][0], coords)


@pytest.mark.slow
def test_one_prompt_streams_the_samplers_tokens(image_path):
  tok = tok_lib.SentencePieceTokenizer()
  out = _Recorder()
  session = generate.run(_args(image=[image_path], prompt='What shape is this?'), stdout=out)
  # The same prompt, rendered independently, through Sampler.generate.
  img = images_lib.load_image(image_path)
  patches, _, hw = images_lib.preprocess(img, images_lib.ImageConfig())
  ids, _ = chat.render_chat(
      [chat.Turn('user', [('image', image_path), ('text', 'What shape is this?')])], tok,
      [images_lib.num_image_tokens(hw)], default_system_prompt='You are a helpful assistant',
      add_generation_prompt=True)
  assert ids[0] == tok.im_system_id and ids.tolist().count(tok.media_pad_id) == hw[0] * hw[1] // 4
  # The CLI's own Sampler (its compiled steps are reused); the prompt is rendered here.
  want = session.sampler.generate(
      [Prompt(ids, generate.hf_pixel_values(patches, hw), np.array([hw]))],
      SamplingParams(max_new_tokens=12, temperature=0.0,
                     stop_token_ids=(tok.im_end_id, tok.eos_id)))
  np.testing.assert_array_equal(session.last_tokens, want.tokens[0])
  text = tok.decode([t for t in want.tokens[0] if t not in (tok.im_end_id, tok.eos_id)])
  printed = out.getvalue()
  assert printed.startswith(text) and printed[len(text):].strip() in (
      '', '[stopped after --max_new_tokens=12 tokens]')
  assert out.writes > 3                     # streamed piece by piece, not printed once


@pytest.mark.slow
def test_interactive_turns_carry_the_history(image_path):
  stdin = io.StringIO(f'/image {image_path}\nWhat is it?\nAnd the color?\n/exit\n')
  out = io.StringIO()
  seen = []
  orig = generate.ChatSession.prompt

  def spy(self, text, image_paths=()):
    p = orig(self, text, image_paths)
    seen.append(p[0])
    return p

  generate.ChatSession.prompt = spy
  try:
    session = generate.run(_args(max_new_tokens=6), stdin=stdin, stdout=out)
  finally:
    generate.ChatSession.prompt = orig
  assert [t.role for t in session.turns] == ['user', 'assistant', 'user', 'assistant']
  first, second = seen
  # The second prompt re-renders the first exchange: it starts with the first prompt, keeps
  # the image (same pixels), then the assistant's answer, <|im_end|>, the new user turn.
  n = len(first.input_ids)
  np.testing.assert_array_equal(second.input_ids[:n], first.input_ids)
  np.testing.assert_array_equal(second.pixel_values, first.pixel_values)
  tok = tok_lib.SentencePieceTokenizer()
  rest = second.input_ids[n:].tolist()
  assert tok.im_end_id in rest and tok.im_user_id in rest[rest.index(tok.im_end_id):]
  printed = out.getvalue()
  assert printed.startswith('> > ') and printed.endswith('\n> ')   # /image, 2 turns, /exit


@pytest.mark.slow
def test_orbax_run_gives_the_hf_reply(hf_model, tmp_path):
  """The same weights saved as a training checkpoint and read back with the stage config."""
  import importlib.util

  import jax.numpy as jnp

  from kimi_vl_jax.train import checkpointing
  from kimi_vl_jax.train.train_step import TrainState, new_counters

  class _Iter:
    def get_state(self):
      return {'i': 0}

    def set_state(self, s):
      pass

  _, params = hf_model
  workdir = str(tmp_path / 'run')
  mgr = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), interval=1, keep=1,
                                   async_save=False)
  state = TrainState(step=jnp.asarray(5, jnp.int32), params=jax.tree.map(jnp.asarray, params),
                     opt_state={},
                     rng=jax.random.PRNGKey(0), counters=new_counters())
  checkpointing.save(mgr, 5, state, _Iter(), {'phase': 0})
  mgr.close()
  spec = importlib.util.spec_from_file_location('sft', os.path.join(ROOT, 'configs',
                                                                   'joint_sft.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config('tiny')
  cfg.model = 'tiny'                        # the checkpoint's architecture
  a = generate.run(_args(prompt='Hello there', system='Be brief.'), stdout=io.StringIO())
  b = generate.run(_args(hf_dir=None, orbax=workdir, config=cfg, tokenizer=None,
                         prompt='Hello there', system='Be brief.'), stdout=io.StringIO())
  np.testing.assert_array_equal(a.last_tokens, b.last_tokens)


def test_wrong_tokenizer_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='--tokenizer'):
    generate.load_model(hf_dir=FIXTURE, tokenizer=str(tmp_path / 'nope.model'))
  with pytest.raises(ValueError, match='tiktoken.model'):
    generate.load_model(hf_dir=FIXTURE, tokenizer=None)
