"""The partial-rollout buffer: groups finish only when all k responses have, older tokens are
masked out of the loss, max_segments bounds a response, the state round-trips."""

import json

import numpy as np
import pytest

from kimi_vl_jax.rl.partial_rollouts import RolloutBuffer, loss_mask


def test_group_waits_for_all_responses_and_masks_older_tokens():
  buf = RolloutBuffer(k=2, segment_tokens=3, max_segments=3)
  g = buf.add(prompt_id=7)
  buf.extend(g, 0, [1, 2], [-.1, -.2], iteration=0, stopped=True)
  buf.extend(g, 1, [3, 4, 5], [-.3, -.4, -.5], iteration=0, stopped=False)
  assert buf.pending() == [(g, 1)] and buf.pop_done() == []
  buf.extend(g, 1, [6], [-.6], iteration=1, stopped=True)
  (done,) = buf.pop_done()
  assert done.prompt_id == 7 and not buf.groups
  r = done.responses[1]
  assert r.tokens == [3, 4, 5, 6] and r.finish_reason == 'stop'
  np.testing.assert_array_equal(loss_mask(r, 1), [0, 0, 0, 1])
  np.testing.assert_array_equal(loss_mask(done.responses[0], 1), [0, 0])


def test_max_segments_ends_a_response_with_length():
  buf = RolloutBuffer(k=1, segment_tokens=2, max_segments=2)
  g = buf.add(0)
  buf.extend(g, 0, [1, 2], [0, 0], 0, stopped=False)
  buf.extend(g, 0, [3, 4], [0, 0], 1, stopped=False)
  (done,) = buf.pop_done()
  assert done.responses[0].finish_reason == 'length'
  with pytest.raises(ValueError, match='finished'):
    buf2 = RolloutBuffer(1, 2, 1)
    g2 = buf2.add(0)
    buf2.extend(g2, 0, [1], [0], 0, stopped=True)
    buf2.extend(g2, 0, [1], [0], 1, stopped=True)


def test_segment_longer_than_budget_is_refused():
  buf = RolloutBuffer(k=1, segment_tokens=2, max_segments=2)
  with pytest.raises(ValueError, match='segment_tokens'):
    buf.extend(buf.add(0), 0, [1, 2, 3], [0, 0, 0], 0, stopped=False)


def test_state_round_trips_through_json():
  buf = RolloutBuffer(k=2, segment_tokens=4, max_segments=3)
  g = buf.add(3)
  buf.extend(g, 0, [9, 8], [-1.5, -2.5], 4, stopped=False)
  back = RolloutBuffer.from_state(json.loads(json.dumps(buf.state())))
  assert back.state() == buf.state() and back.pending() == buf.pending()
  assert back.add(1) == g + 1
