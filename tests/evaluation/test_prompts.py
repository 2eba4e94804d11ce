import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import prompts

TOK = make_tokenizer()
CFG = prompts.eval_image_config({'max_patches': 16})


def _image(seed, size=56):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))


def test_hf_pixel_values_invert_the_merge_order():
  x = np.random.default_rng(0).normal(size=(56, 84, 3)).astype(np.float32)
  patches, _ = images_lib.patchify(x)
  pv = prompts.hf_pixel_values(patches, (4, 6))                 # [24, 3, 14, 14] row-major
  for r in range(4):
    for c in range(6):
      expect = x[14 * r:14 * r + 14, 14 * c:14 * c + 14].transpose(2, 0, 1)
      np.testing.assert_array_equal(pv[r * 6 + c], expect)


def test_build_prompt_and_measure_agree():
  imgs = {'a': _image(0), 'b': _image(1, 112)}
  msgs = [{'role': 'user', 'content': [{'type': 'image', 'image': 'a'}, {'type': 'text', 'text': 'hi'},
                                       {'type': 'image', 'image': 'b'}]}]
  p = prompts.build_prompt(msgs, TOK, CFG, images=imgs)
  assert p.image_grid_hws.tolist() == [[4, 4], [4, 4]]          # 112 px shrunk to 16 patches
  assert p.pixel_values.shape == (32, 3, 14, 14)
  assert int(np.sum(p.input_ids == TOK.media_pad_id)) == 8
  tail = [TOK.special['<|im_assistant|>']] + TOK.encode('assistant') + [TOK.special['<|im_middle|>']]
  assert p.input_ids[-len(tail):].tolist() == tail             # generation prompt appended
  assert prompts.make_measure(TOK, CFG)(msgs, imgs) == len(p.input_ids)
  text = prompts.build_prompt([{'role': 'user', 'content': 'hello'}], TOK, CFG)
  assert text.pixel_values is None and text.image_grid_hws is None


def test_files_are_read_under_root(tmp_path):
  _image(2).save(tmp_path / 'x.png')
  msgs = [{'role': 'user', 'content': [{'type': 'image', 'image': 'x.png'}]}]
  p = prompts.build_prompt(msgs, TOK, CFG, root=str(tmp_path))
  assert p.pixel_values.shape == (16, 3, 14, 14)
  with pytest.raises(Exception, match='outside|escapes|root'):
    prompts.build_prompt([{'role': 'user', 'content': [{'type': 'image', 'image': '../y.png'}]}],
                         TOK, CFG, root=str(tmp_path))
