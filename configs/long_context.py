"""Joint long-context activation (Kimi-VL report section 2.3; docs/recipe.md).

The context grows 8K -> 32K -> 128K in two sub-stages, each a phase of this config with its own
row length; the RoPE base goes from 50000 to 800000 at the start. Data: 25% long data and 75%
replay of shorter data; 0.3T tokens, split evenly between the phases. Continues from the cooldown
run. The report's long data is long text, long video, long documents and interleaved data; they
share the 25% equally (the report gives no split inside the long data). Long video is chat
records whose video parts are frames with timestamps (docs/video.md): `{data_dir}/long/video.
array_record` in the full config; the tiny variant reads the generated moving-shape videos
`demo:video/train.jsonl` (build_demo.py), subsampled to 16 frames and further to fit the row
(about 10 frames at 256 tokens, all 16 at 512).

  python -m kimi_vl_jax.main --config=configs/long_context.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN --config.init_from=orbax:COOLDOWN_RUN
  python -m kimi_vl_jax.main --config=configs/long_context.py:tiny --workdir=/tmp/long
"""

from kimi_vl_jax.train import stage_config as sc

TOKENS = 0.3e12
ROPE_THETA = 800000.0
LONG_SHARE = 0.25


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('long_context', arg)
  c.model_overrides.text = {'rope_theta': ROPE_THETA}
  if arg == 'tiny':
    c.data.sources = [
        sc.source('long_text', 'text', 'demo:arithmetic/text_train.jsonl', LONG_SHARE / 2),
        sc.source('long_video', 'chat', 'demo:video/train.jsonl', LONG_SHARE / 2),
        sc.source('replay_vqa', 'chat', 'demo:easy_vqa/train.jsonl', 1 - LONG_SHARE),
    ]
    c.data.max_patches = 384
    c.data.max_images = 24
    c.data.image = {'max_patches': 16, 'max_video_frames': 16}
    c.data.batch_size = 4
    c.phases = [
        {'name': 'ctx_256', 'steps': 40, 'data': {'seq_len': 256}},
        {'name': 'ctx_512', 'steps': 40, 'data': {'seq_len': 512}},
    ]
    c.optim.schedule = {'kind': 'multi_phase', 'phases': [
        {'steps': 40, 'warmup_steps': 5, 'peak_lr': 1e-3, 'end_lr': 5e-4},
        {'steps': 40, 'warmup_steps': 5, 'peak_lr': 5e-4, 'end_lr': 1e-4}]}
    return c

  c.init_from = 'orbax:{joint_cooldown_run}'  # set --config.init_from=orbax:WORKDIR
  # Up to 256 frames per video; fewer where a row's patches / tokens run out (docs/video.md).
  c.data.image = {'max_patches': 4096, 'max_video_frames': 256}
  c.data.sources = [
      sc.source('long_text', 'text', '{data_dir}/long/text.array_record', LONG_SHARE / 4),
      sc.source('long_video', 'chat', '{data_dir}/long/video.array_record', LONG_SHARE / 4),
      sc.source('long_document', 'chat', '{data_dir}/long/document.array_record', LONG_SHARE / 4),
      sc.source('interleaved', 'chat', '{data_dir}/long/interleaved.array_record', LONG_SHARE / 4),
      sc.source('replay_text', 'text', '{data_dir}/cooldown/text.array_record', 0.45),
      sc.source('replay_multimodal', 'chat', '{data_dir}/cooldown/multimodal.array_record', 0.30),
  ]
  # Same tokens per step at every length: rows shrink as the context grows.
  rows_32k, rows_128k = sc.A3B_GLOBAL_ROWS // 4, sc.A3B_GLOBAL_ROWS // 16
  steps_32k = sc.tokens_to_steps(TOKENS / 2, 32768, rows_32k)
  steps_128k = sc.tokens_to_steps(TOKENS / 2, 131072, rows_128k)
  c.phases = [
      {'name': 'ctx_32k', 'steps': steps_32k,
       'data': {'seq_len': 32768, 'batch_size': rows_32k // sc.A3B_HOSTS,
                'max_patches': 65536, 'max_images': 256}},
      {'name': 'ctx_128k', 'steps': steps_128k,
       'data': {'seq_len': 131072, 'batch_size': max(1, rows_128k // sc.A3B_HOSTS),
                'max_patches': 262144, 'max_images': 1024}},
  ]
  c.optim.schedule = {'kind': 'multi_phase', 'phases': [
      {'steps': steps_32k, 'warmup_steps': 100, 'peak_lr': 3e-5, 'end_lr': 2e-5},
      {'steps': steps_128k, 'warmup_steps': 100, 'peak_lr': 2e-5, 'end_lr': 1e-5}]}
  c.parallel.context = 4
  c.parallel.rules = 'fsdp_ep_cp'
  c.eval.data = {'sources': [sc.source('heldout', 'text', '{data_dir}/long/heldout.jsonl')]}
  c.eval.every = 1000
  return c
