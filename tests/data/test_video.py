"""Video records: parsing, timestamps, subsampling over time, the row budget, the pipeline."""

import importlib.util
import os

import numpy as np
import pytest

from kimi_vl_jax.data import chat
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import pipeline
from kimi_vl_jax.data import sources
from kimi_vl_jax.data import video

from data_helpers import write_jsonl, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_format_timestamp():
  assert video.format_timestamp(0) == '00:00:00.000'
  assert video.format_timestamp(1.5) == '00:00:01.500'
  assert video.format_timestamp(3725.0625) == '01:02:05.062'
  assert video.format_timestamp(59.9996) == '00:01:00.000'
  assert video.format_timestamp(100 * 3600) == '100:00:00.000'


def test_parse_video_fps_and_timestamps():
  v = video.parse_video({'type': 'video', 'frames': ['a', 'b', 'c'], 'fps': 4})
  assert v.frames == ('a', 'b', 'c') and v.timestamps == (0.0, 0.25, 0.5)
  v = video.parse_video({'frames': ['a', 'b'], 'timestamps': [1, 2.5]})
  assert v.timestamps == (1.0, 2.5)
  assert v.select([1]) == video.Video(('b',), (2.5,))


@pytest.mark.parametrize('part, match', [
    ({'frames': []}, 'non-empty'),
    ({'frames': 'clip.mp4', 'fps': 2}, 'non-empty'),
    ({'frames': ['a', 3], 'fps': 2}, 'path strings'),
    ({'frames': ['a', 'b']}, 'exactly one'),
    ({'frames': ['a', 'b'], 'fps': 2, 'timestamps': [0, 1]}, 'exactly one'),
    ({'frames': ['a', 'b'], 'fps': 0}, '> 0'),
    ({'frames': ['a', 'b'], 'fps': True}, '> 0'),
    ({'frames': ['a', 'b'], 'timestamps': [0]}, 'one entry per frame'),
    ({'frames': ['a', 'b'], 'timestamps': [0, float('nan')]}, 'finite'),
    ({'frames': ['a', 'b'], 'timestamps': [-1, 0]}, '>= 0'),
    ({'frames': ['a', 'b'], 'timestamps': [1, 1]}, 'strictly increasing'),
])
def test_bad_video_parts(part, match):
  with pytest.raises(ValueError, match=match):
    video.parse_video(part)
  record = {'messages': [{'role': 'user', 'content': [{'type': 'video', **part}]},
                         {'role': 'assistant', 'content': 'y'}]}
  with pytest.raises(chat.SkipExample) as e:
    chat.parse_conversation(record)
  assert e.value.reason == 'bad_schema'


def test_subsample_keeps_first_and_last_uniformly_over_time():
  np.testing.assert_array_equal(video.subsample_indices(range(10), 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(video.subsample_indices(range(5), 9), np.arange(5))
  np.testing.assert_array_equal(video.subsample_indices(range(5), 1), [0])
  # Irregular times: the picks follow time, not the frame index.
  ts = [0, 0.1, 0.2, 0.3, 0.4, 5, 9.8, 9.9, 10]
  np.testing.assert_array_equal(video.subsample_indices(ts, 3), [0, 5, 8])
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(2, 60))
    ts = np.cumsum(rng.uniform(0.01, 2.0, n))
    m = int(rng.integers(2, n + 1))
    idx = video.subsample_indices(ts, m)
    assert len(idx) == m and idx[0] == 0 and idx[-1] == n - 1
    assert (np.diff(idx) > 0).all()


def test_fit_frames_caps_every_video_to_the_budget():
  # Two videos (10 and 4 frames, each frame 3 tokens / 4 patches / 1 image) + 5 fixed tokens.
  costs = [np.tile([3, 4, 1], (10, 1)), np.tile([3, 4, 1], (4, 1))]
  times = [np.arange(10.0), np.arange(4.0)]
  keep, fits = video.fit_frames(costs, times, [5, 0, 0], [100, 1000, 100])
  assert fits and [len(k) for k in keep] == [10, 4]
  keep, fits = video.fit_frames(costs, times, [5, 0, 0], [100, 36, 100])  # 9 frames of patches
  assert fits and [len(k) for k in keep] == [5, 4]
  np.testing.assert_array_equal(keep[0], video.subsample_indices(times[0], 5))
  keep, fits = video.fit_frames(costs, times, [5, 0, 0], [100, 100, 7])  # 7 images: cap 3
  assert fits and [len(k) for k in keep] == [3, 3]
  keep, fits = video.fit_frames(costs[:1] + [costs[1][:2]], times[:1] + [times[1][:2]],
                                [5, 0, 0], [5 + 3 * 7, 100, 100])  # 7 frames' tokens: cap 5
  assert fits and [len(k) for k in keep] == [5, 2]
  keep, fits = video.fit_frames(costs, times, [5, 0, 0], [100, 12, 100])  # < first + last
  assert not fits and [len(k) for k in keep] == [2, 2]


def test_render_video_frames_after_their_timestamps(tok):
  turns = chat.parse_conversation({'messages': [
      {'role': 'user', 'content': [
          {'type': 'image', 'image': 'x.png'},
          {'type': 'video', 'frames': ['f0.png', 'f1.png', 'f2.png'], 'timestamps': [0, 1.5, 62]},
          {'type': 'text', 'text': 'what moves?'}]},
      {'role': 'assistant', 'content': 'a circle'}]})
  assert chat.image_refs(turns) == ['x.png', 'f0.png', 'f1.png', 'f2.png']
  assert [len(v) for v in chat.videos(turns)] == [3]
  ids, mask = chat.render_chat(turns, tok, [1, 2, 3, 4])
  text = tok.decode(ids)
  pads = '<|media_pad|>'
  want = ('<|media_start|> image<|media_content|>' + pads + '<|media_end|> 00:00:00.000'
          '<|media_start|> image<|media_content|>' + pads * 2 + '<|media_end|> 00:00:01.500'
          '<|media_start|> image<|media_content|>' + pads * 3 + '<|media_end|> 00:01:02.000'
          '<|media_start|> image<|media_content|>' + pads * 4 + '<|media_end|>')
  assert want in text.replace(' <|media_start|>', '<|media_start|>'), text
  assert tok.decode(ids[mask == 1]).strip() == 'a circle<|im_end|>'
  # Each frame adds exactly what `frame_tokens` says (the budget arithmetic relies on it).
  short = chat.replace_videos(turns, [chat.videos(turns)[0].select([0, 2])])
  ids2, _ = chat.render_chat(short, tok, [1, 2, 4])
  assert len(ids) - len(ids2) == chat.frame_tokens(tok, 1.5, 3)
  with pytest.raises(ValueError, match='placeholder counts'):
    chat.render_chat(turns, tok, [1, 2, 3])


def test_video_in_assistant_or_system_turns():
  part = {'type': 'video', 'frames': ['a.png'], 'fps': 1}
  with pytest.raises(chat.SkipExample) as e:
    chat.parse_conversation({'messages': [{'role': 'user', 'content': 'x'},
                                          {'role': 'assistant', 'content': [part]}]})
  assert e.value.reason == 'image_only_assistant'
  with pytest.raises(chat.SkipExample) as e:
    chat.parse_conversation({'messages': [{'role': 'system', 'content': [part]},
                                          {'role': 'user', 'content': 'x'},
                                          {'role': 'assistant', 'content': 'y'}]})
  assert e.value.reason == 'bad_schema'


def _video_dataset(tmp_path, n_frames=(20, 6, 3), size=(56, 56)):
  """Videos of n frames each (4 x 4 patches per 56x56 frame) and one image chat."""
  recs = []
  for v, n in enumerate(n_frames):
    frames = [write_png(str(tmp_path / f'v{v}' / f'{k}.png'), size, seed=100 * v + k)
              for k in range(n)]
    rel = [os.path.relpath(f, tmp_path) for f in frames]
    timing = {'fps': 2} if v % 2 == 0 else {'timestamps': [0.25 * k * k for k in range(n)]}
    recs.append({'messages': [
        {'role': 'user', 'content': [{'type': 'video', 'frames': rel, **timing},
                                     {'type': 'text', 'text': f'video {v}'}]},
        {'role': 'assistant', 'content': 'a shape'}]})
  return write_jsonl(str(tmp_path / 'videos.jsonl'), recs), recs


def _maker(tok, root, budget=None, **image):
  return sources.ExampleMaker(tokenizer=tok, kind='chat', source_index=0, name='v', root=root,
                              fmt='jsonl', image_cfg=images_lib.ImageConfig(**image),
                              budget=budget)


def _timestamps_in(tok, ids):
  """The timestamp texts before the image blocks of a rendered example, in order."""
  text = tok.decode(ids).replace(' ', '')
  return [t.split('<|media_start|>')[0][-12:] for t in text.split('<|media_end|>')[:-1]]


def test_example_maker_subsamples_to_max_frames_and_to_the_budget(tmp_path, tok):
  path, recs = _video_dataset(tmp_path)
  src = sources.open_source(path)
  maker = _maker(tok, str(tmp_path), max_video_frames=8)
  e = maker(src[0], np.random.default_rng(0))  # 20 frames at 2 fps -> 8 frames
  idx = video.subsample_indices([k / 2 for k in range(20)], 8)
  assert idx[0] == 0 and idx[-1] == 19
  assert _timestamps_in(tok, e['input_ids']) == [video.format_timestamp(k / 2) for k in idx]
  assert e['image_grid_hws'].tolist() == [[4, 4]] * 8 and len(e['patches']) == 8 * 16
  assert e['video_stats'].tolist() == [1, 8, 12, 0]
  # Same frames, same patches: frame k of the example is frame idx[k] of the video.
  one = sources.load_images([recs[0]['messages'][0]['content'][0]['frames'][idx[3]]],
                            str(tmp_path), images_lib.ImageConfig())[0]
  np.testing.assert_array_equal(e['patches'][3 * 16:4 * 16], one)
  assert (e['input_ids'] == tok.media_pad_id).sum() * 4 == len(e['patches'])

  # A row budget of 80 patches: 5 frames of 16 patches.
  budget = {'seq_len': 10_000, 'max_patches': 80, 'max_images': 64}
  e = _maker(tok, str(tmp_path), budget, max_video_frames=8)(src[0], np.random.default_rng(0))
  assert len(e['patches']) == 80 and e['video_stats'].tolist() == [1, 5, 12, 3]
  ts = _timestamps_in(tok, e['input_ids'])
  assert ts[0] == '00:00:00.000' and ts[-1] == '00:00:09.500'
  # A token budget: the fewest frames that fit, measured on the rendered ids.
  full = _maker(tok, str(tmp_path))(src[1], np.random.default_rng(0))
  per_frame = chat.frame_tokens(tok, 0.25, 4)
  budget = {'seq_len': len(full['input_ids']) - 2 * per_frame, 'max_patches': 10_000,
            'max_images': 64}
  e = _maker(tok, str(tmp_path), budget)(src[1], np.random.default_rng(0))
  assert len(e['input_ids']) <= budget['seq_len'] and e['video_stats'].tolist()[1] < 6
  assert e['video_stats'].tolist() == [1, 6 - e['video_stats'][3], 0, e['video_stats'][3]]


def test_frames_of_a_video_share_one_augmentation(tmp_path, tok):
  frame = write_png(str(tmp_path / 'same.png'), (70, 42), seed=5)
  record = {'messages': [
      {'role': 'user', 'content': [{'type': 'video', 'frames': ['same.png'] * 6, 'fps': 1}]},
      {'role': 'assistant', 'content': 'x'}]}
  path = write_jsonl(str(tmp_path / 'v.jsonl'), [record])
  maker = _maker(tok, str(tmp_path), augment=True, hflip_prob=0.5, scale_min=0.5, scale_max=1.5)
  src = sources.open_source(path)
  for seed in range(4):
    e = maker(src[0], np.random.default_rng(seed))
    grids = e['image_grid_hws']
    assert (grids == grids[0]).all()
    p = e['patches'].reshape(6, -1, images_lib.PATCH_DIM)
    assert all(np.array_equal(p[0], p[k]) for k in range(6))
  assert os.path.isfile(frame)


def test_videos_through_the_pipeline_are_counted(tmp_path, tok):
  path, _ = _video_dataset(tmp_path, n_frames=(20, 6, 3, 40))
  # Row: 96 patches = 6 frames. Video 0: 20 -> 8 (max) -> 6 (budget); video 3: 40 -> 8 -> 6.
  cfg = dict(sources=[dict(name='v', kind='chat', path=path)], seq_len=1024, max_patches=96,
             max_images=8, batch_size=1, shuffle=False, num_epochs=1,
             image=dict(max_video_frames=8), packing=dict(num_bins=1, shuffle_bins=False))
  it = pipeline.make_iterator(cfg, tok)
  rows = list(it)
  s = pipeline.data_stats(it)
  assert s['videos/v'] == 4 and s['frames/v'] == 6 + 6 + 3 + 6 == s['images/v']
  assert s['frames_subsampled/v'] == 12 + 32 and s['frames_over_budget/v'] == 2 + 2
  assert s['skip_rate'] == 0
  for b in rows:
    assert (b['input_ids'] == tok.media_pad_id).sum() * 4 == (b['patch_image_ids'] > 0).sum()
  # A budget that cannot hold even the first and last frame: a counted skip, nothing truncated.
  cfg['max_patches'] = 28
  it = pipeline.make_iterator(cfg, tok)
  list(it)
  s = pipeline.data_stats(it)
  assert s['skipped/v/too_many_patches'] == 4 and s.get('videos/v', 0) == 0


def test_max_video_frames_config():
  assert images_lib.ImageConfig.from_config({'max_video_frames': 3}).max_video_frames == 3
  with pytest.raises(ValueError, match='max_video_frames'):
    images_lib.ImageConfig.from_config({'max_video_frames': 1})


def _load_config(stage):
  spec = importlib.util.spec_from_file_location(stage, os.path.join(ROOT, 'configs', f'{stage}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config('tiny')


def test_long_context_tiny_batches_hold_video_frames_with_timestamps(tok):
  from kimi_vl_jax.train.stage_config import resolve_phases
  phases = resolve_phases(_load_config('long_context'))
  names = [s['name'] for s in phases[0]['data'].sources]
  assert 'long_video' in names
  for ph, want_frames in zip(phases, (10, 16)):
    it = pipeline.make_iterator(ph['data'], tok, seed=0)
    found = 0
    for _ in range(3):
      b = next(it)
      for r in range(b['input_ids'].shape[0]):
        for s in range(1, b['segment_ids'][r].max() + 1):
          ids = b['input_ids'][r][b['segment_ids'][r] == s]
          ts = [t for t in _timestamps_in(tok, ids) if t[2] == ':' and t[-4] == '.']
          if len(ts) > 1:  # a video: every frame after a timestamp, increasing, first at 0
            found += 1
            n_images = (ids == tok.special['<|media_start|>']).sum()
            assert len(ts) == n_images and ts[0] == '00:00:00.000' and ts == sorted(ts)
            assert 2 <= len(ts) <= want_frames
    stats = pipeline.data_stats(it)
    assert found and stats['videos/long_video'] >= found
    assert stats['frames/long_video'] <= want_frames * stats['videos/long_video']
