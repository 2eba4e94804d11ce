"""Loop-corrected cost of a compiled program: FLOPs, HBM bytes and collective bytes per device.

XLA's `compiled.cost_analysis()` counts the body of every `while` loop once, so a train step
whose layers run under `nn.scan` (and whose blockwise attention, gradient accumulation or
optimizer run under `lax.scan` / `fori_loop`) is undercounted by about the number of layers.
`hlo_cost(compiled.as_text())` walks the optimised HLO module instead and multiplies every loop
body by its trip count, through nested loops and called computations:

* trip counts: the `known_trip_count` XLA writes into a while loop's backend config; else the
  constant its condition compares the induction variable with (`i < N`, from the start value the
  loop's initial tuple holds, step 1); else the loop is counted once and listed in
  `unknown_trip_counts`;
* FLOPs: `dot` and `ragged-dot` = 2 x output elements x contracted size; `convolution` = 2 x
  output elements x kernel elements per output feature (padding positions included); these are
  the `matmul_flops` (MXU work, what MFU is computed against). `flops` adds one per output
  element of elementwise arithmetic and one per input element of a reduction; transcendentals
  (exp, log, tanh, ...) are counted apart, as XLA does. FLOPs inside fusions are counted per
  fused instruction;
* HBM bytes: per instruction of an executed computation at fusion granularity (XLA's cost model):
  operand bytes + output bytes, of the arrays in HBM (a TPU layout's memory space `S(n)`, n > 0,
  is on-chip memory and not counted). A fusion operand read only through (dynamic-)slices or
  gathers counts the sliced bytes; a dynamic-update-slice in place (top level or a fusion's
  root) counts the update, not the whole buffer. Parameters, constants, tuples, bitcasts and control flow
  move nothing;
* collective bytes: the payload of each all-gather, all-reduce, reduce-scatter, all-to-all,
  ragged-all-to-all and collective-permute (sync or async `-start`): the larger of the operand
  and result bytes (for an all-gather the gathered result, for a reduce-scatter its input);
* conditionals (e.g. the blockwise attention's live / dead blocks): the branch with the most
  FLOPs (an upper bound, `flops` etc.) and the one with the fewest (`lower`); which branch runs
  depends on the data, so the truth lies between;
* custom calls (Pallas kernels, TPU library calls) have no shape-derived cost: their count is in
  `custom_calls`, their FLOPs are not.

Each FLOP / byte is attributed to a part of the model by the instruction's `op_name` metadata,
which carries the Flax module path and `jax.named_scope`s (`part_of`): the vision tower and
projector, the decoder's attention, its MLP / MoE, the rest of its layer stack (norms, residuals,
the scan's stacking of residuals), the final norm, head and loss, the optimizer; the rest is
`other` (embedding lookup, image scatter, gradient bookkeeping of the step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict
from typing import Callable

METRICS = ('flops', 'matmul_flops', 'transcendentals', 'bytes', 'collective_bytes')
PARTS = ('vision', 'attention', 'mlp_moe', 'decoder', 'loss', 'optimizer', 'other')

_DTYPE_BYTES = {'pred': 1, 's2': 0.25, 'u2': 0.25, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1,
                's16': 2, 'u16': 2, 's32': 4, 'u32': 4, 's64': 8, 'u64': 8, 'f16': 2,
                'bf16': 2, 'f32': 4, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0, 'opaque': 0}
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([^\]]*)\](\{[^}]*\})?')

# Elementwise opcodes XLA counts as one FLOP per element, and those it counts as transcendentals.
_ELEMENTWISE = frozenset((
    'add', 'subtract', 'multiply', 'divide', 'remainder', 'maximum', 'minimum', 'negate', 'abs',
    'sign', 'floor', 'ceil', 'round-nearest-afz', 'round-nearest-even', 'clamp', 'select',
    'compare', 'and', 'or', 'xor', 'not', 'shift-left', 'shift-right-logical',
    'shift-right-arithmetic', 'convert', 'is-finite', 'real', 'imag', 'popcnt', 'clz'))
_TRANSCENDENTAL = frozenset((
    'exponential', 'exponential-minus-one', 'log', 'log-plus-one', 'tanh', 'logistic', 'sqrt',
    'rsqrt', 'cbrt', 'power', 'sine', 'cosine', 'tan', 'atan2', 'erf'))
_COLLECTIVES = frozenset((
    'all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
    'collective-permute', 'collective-broadcast', 'all-gather-start', 'all-reduce-start',
    'collective-permute-start'))
# Instructions that move no HBM bytes of their own (control flow is counted in its bodies).
_NO_BYTES = frozenset((
    'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'while', 'conditional',
    'call', 'after-all', 'partition-id', 'replica-id', 'opt-barrier', 'add-dependency', 'domain',
    'all-gather-done', 'all-reduce-done', 'collective-permute-done', 'copy-done', 'async-done',
    'async-update', 'send-done', 'recv-done'))
_SLICING = frozenset(('slice', 'dynamic-slice', 'gather'))
# TPU compiler custom calls that mark buffers or collectives and compute nothing.
_NO_COMPUTE_CALLS = frozenset((
    'AllocateBuffer', 'AssumeGatherIndicesInBound', 'AsyncCollectiveStart', 'AsyncCollectiveDone',
    'ConcatBitcast', 'GatherScatterIndicesBitpacked', 'Sharding', 'SPMDFullToShardShape',
    'SPMDShardToFullShape', 'MoveToHost', 'MoveToDevice', 'annotate_device_placement'))


# --------------------------------------------------------------------------------------------
# Shapes and the parsed module.

@dataclasses.dataclass(frozen=True)
class Shape:
  """An HLO shape: (dtype, dims, memory space) arrays (one for an array, several for a tuple).
  Memory space 0 is HBM; others (`S(1)` in a TPU layout: on-chip VMEM, ...) are not."""
  arrays: tuple[tuple[str, tuple[int, ...], int], ...]

  @classmethod
  def parse(cls, text: str) -> 'Shape':
    arrays = []
    for dtype, dims, layout in _ARRAY.findall(text):
      dims = tuple(int(d.replace('<=', '')) for d in dims.split(',') if d.strip())
      space = re.search(r'S\((\d+)\)', layout)
      arrays.append((dtype, dims, int(space.group(1)) if space else 0))
    return cls(tuple(arrays))

  @property
  def dims(self) -> tuple[int, ...]:
    return self.arrays[0][1] if self.arrays else ()

  @property
  def elements(self) -> int:
    return sum(math.prod(d) for _, d, _ in self.arrays)

  @property
  def bytes(self) -> float:
    """Bytes of the arrays in any memory space."""
    return sum(math.prod(d) * _dtype_bytes(t) for t, d, _ in self.arrays)

  @property
  def hbm_bytes(self) -> float:
    """Bytes of the arrays in HBM (memory space 0)."""
    return sum(math.prod(d) * _dtype_bytes(t) for t, d, m in self.arrays if m == 0)


def _dtype_bytes(dtype: str) -> float:
  if dtype in _DTYPE_BYTES:
    return _DTYPE_BYTES[dtype]
  if dtype.startswith('f8') or dtype.startswith('f4') or dtype.startswith('f6'):
    return int(dtype[1]) / 8
  raise ValueError(f'unknown HLO element type {dtype!r}')


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape_text: str
  operands: list[str]
  attrs: str          # everything after the operand list
  op_name: str
  line: str

  @functools.cached_property
  def shape(self) -> Shape:
    return Shape.parse(self.shape_text)

  def attr(self, key: str) -> str | None:
    m = re.search(rf'\b{key}=(%?[\w.\-]+|\{{[^}}]*\}})', self.attrs)
    return m.group(1) if m else None

  def called(self, key: str) -> list[str]:
    v = self.attr(key)
    if v is None:
      return []
    return re.findall(r'%?([\w.\-]+)', v.strip('{}'))


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list[Instruction]
  root: Instruction | None


_BRACKET = re.compile(r'[()\[\]{}"\\]')


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start] ('(' or '{')."""
  end = text.find(')', start)
  if text[start] == '(' and end > 0 and '(' not in text[start + 1:end] and '"' not in text[
      start:end]:
    return end + 1                                  # the common case: no nesting
  close = {'(': ')', '{': '}', '[': ']'}
  stack, quoted, skip = [], False, -1
  for m in _BRACKET.finditer(text, start):
    i, ch = m.start(), m.group()
    if i == skip:
      continue
    if quoted:
      if ch == '\\':
        skip = i + 1
      elif ch == '"':
        quoted = False
    elif ch == '"':
      quoted = True
    elif ch in close:
      stack.append(close[ch])
    elif stack and ch == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  raise ValueError(f'unbalanced HLO text at {text[start:start + 80]!r}')


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$')


def _parse_instruction(line: str) -> tuple[Instruction, bool]:
  m = _INSTR.match(line)
  name, i = m.group(1), m.end()
  if line[i] == '(':
    j = _balanced(line, i)
  else:
    j = line.index(' ', i)
  shape = line[i:j]
  k = line.index('(', j)
  opcode = line[j:k].strip()
  end = _balanced(line, k)
  operands = [] if opcode == 'constant' else re.findall(r'%([\w.\-]+)', line[k:end])
  attrs = line[end:]
  op = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
  root = line.lstrip().startswith('ROOT ')
  return Instruction(name, opcode, shape, operands, attrs, op.group(1) if op else '', line), root


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
  """HLO module text -> ({computation name: Computation}, entry name)."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if cur is None:
      m = _COMP.match(line)
      if m:
        cur = Computation(m.group(1), [], None)
        if line.startswith('ENTRY'):
          entry = cur.name
      continue
    if line.startswith('}'):                       # '}' or '}, execution_thread="..."'
      comps[cur.name] = cur
      cur = None
      continue
    if not _INSTR.match(line):
      continue
    inst, is_root = _parse_instruction(line)
    cur.instructions.append(inst)
    if is_root:
      cur.root = inst
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  for c in comps.values():
    if c.root is None and c.instructions:
      c.root = c.instructions[-1]
  return comps, entry


# --------------------------------------------------------------------------------------------
# Parts of the model, from op_name metadata.

@functools.lru_cache(maxsize=None)
def part_of(op_name: str) -> str:
  """The part of the train step an instruction belongs to, from its `op_name` path (Flax module
  names and `jax.named_scope`s; forward `jvp(...)` and backward `transpose(...)` alike)."""
  parts = set(re.split(r'[/()]', op_name))
  if 'optimizer' in parts:
    return 'optimizer'
  if parts & {'vision_tower', 'projector', 'KimiVL.encode_images'}:
    return 'vision'
  if 'self_attn' in parts:
    return 'attention'
  if 'mlp' in parts:
    return 'mlp_moe'
  if parts & {'language_model._run', 'dense_layers', 'moe_layers'}:
    return 'decoder'
  if parts & {'loss', 'lm_head', 'norm'}:
    return 'loss'
  return 'other'


# --------------------------------------------------------------------------------------------
# The walk.

class _Vec(defaultdict):
  """(part, metric) -> amount, with + and scalar *."""

  def __init__(self, *a):
    super().__init__(float, *a)

  def add(self, other: '_Vec', times: float = 1.0) -> '_Vec':
    for k, v in other.items():
      self[k] += v * times
    return self

  def total(self, metric: str) -> float:
    return sum(v for (_, m), v in self.items() if m == metric)


@dataclasses.dataclass
class StepCost:
  """Per-device totals of one run of the program, loop-corrected.

  totals / lower: metric -> amount (`lower` takes each conditional's cheapest branch);
  by_part: part -> metric -> amount (upper bound); collectives: opcode -> bytes;
  loops: (op_name of the loop, trip count) for every while loop; unknown_trip_counts: loops
  counted once; custom_calls: target -> executions of custom calls that may compute (their FLOPs
  are not counted; the TPU compiler's buffer and collective markers are left out).
  """
  totals: dict[str, float]
  lower: dict[str, float]
  by_part: dict[str, dict[str, float]]
  collectives: dict[str, float]
  loops: list[tuple[str, int]]
  unknown_trip_counts: list[str]
  custom_calls: dict[str, float]

  @property
  def flops(self) -> float:
    return self.totals['flops']

  @property
  def matmul_flops(self) -> float:
    return self.totals['matmul_flops']

  @property
  def bytes(self) -> float:
    return self.totals['bytes']

  @property
  def collective_bytes(self) -> float:
    return self.totals['collective_bytes']


class _Walker:

  def __init__(self, comps: dict[str, Computation], part_fn: Callable[[str], str], mode: str):
    self.comps, self.part_fn, self.mode = comps, part_fn, mode
    self.by_name = {i.name: i for c in comps.values() for i in c.instructions}
    self.memo: dict[tuple[str, bool], _Vec] = {}
    # TPU async collectives: a fusion rooted at the AsyncCollectiveStart custom call holds the
    # collective, and one rooted at AsyncCollectiveDone holds a copy of it (same channel); only
    # the first is the transfer.
    self.done_fusions = {c.name for c in comps.values() if c.root is not None
                         and c.root.opcode == 'custom-call'
                         and _target(c.root) == 'AsyncCollectiveDone'}
    self.loops: list[tuple[str, int]] = []
    self.unknown: list[str] = []

  # ---- computations
  def computation(self, name: str, fused: bool) -> _Vec:
    """Cost of one run of computation `name`; `fused`: inside a fusion (no bytes of its own)."""
    key = (name, fused)
    if key not in self.memo:
      v = _Vec()
      done = name in self.done_fusions
      for inst in self.comps[name].instructions:
        if not (done and inst.opcode in _COLLECTIVES):
          v.add(self.instruction(inst, fused))
      self.memo[key] = v
    return self.memo[key]

  def instruction(self, inst: Instruction, fused: bool) -> _Vec:
    v = _Vec()
    part = self.part_fn(inst.op_name)
    op = inst.opcode
    if op == 'while':
      n = self.trip_count(inst)
      v.add(self.computation(inst.called('body')[0], False), n)
      v.add(self.computation(inst.called('condition')[0], False), n + 1)
      return v
    if op == 'conditional':
      branches = (inst.called('branch_computations')
                  or inst.called('true_computation') + inst.called('false_computation'))
      costs = [self.computation(b, False) for b in branches]
      pick = max if self.mode == 'max' else min
      v.add(pick(costs, key=lambda c: (c.total('flops'), c.total('bytes'))))
      return v
    if op in ('call', 'async-start'):
      for c in inst.called('to_apply') + inst.called('calls'):
        v.add(self.computation(c, fused))
      return v
    if op == 'fusion':
      for c in inst.called('calls'):
        v.add(self.computation(c, True))
    elif op == 'custom-call' and _target(inst) not in _NO_COMPUTE_CALLS:
      v[('_custom:' + _target(inst), 'calls')] += 1
    elif op in ('dot', 'ragged-dot'):    # ragged: each lhs row meets one group's matrix
      lhs = self.by_name[inst.operands[0]].shape.dims
      k = math.prod(lhs[int(d)] for d in _dims(inst.attr('lhs_contracting_dims')))
      f = 2.0 * inst.shape.elements * k
      v[(part, 'flops')] += f
      v[(part, 'matmul_flops')] += f
    elif op == 'convolution':
      f = 2.0 * inst.shape.elements * self.conv_kernel_per_output(inst)
      v[(part, 'flops')] += f
      v[(part, 'matmul_flops')] += f
    elif op in _ELEMENTWISE:
      v[(part, 'flops')] += inst.shape.elements
    elif op in _TRANSCENDENTAL:
      v[(part, 'transcendentals')] += inst.shape.elements
    elif op in ('reduce', 'reduce-window', 'scatter', 'select-and-scatter'):
      src = inst.operands[2] if op == 'scatter' else inst.operands[0]
      v[(part, 'flops')] += self.by_name[src].shape.elements
    if op in _COLLECTIVES:
      b = self.collective_bytes(inst)
      v[(part, 'collective_bytes')] += b
      v[('_kind:' + op.removesuffix('-start'), 'by_kind')] += b
    if not fused:
      v[(part, 'bytes')] += self.bytes_of(inst)
    return v

  # ---- helpers
  def trip_count(self, inst: Instruction) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if m:
      n = int(m.group(1))
    else:
      n = self.trip_count_from_condition(inst)
    if n is None:
      self.unknown.append(inst.op_name or inst.name)
      n = 1
    self.loops.append((inst.op_name or inst.name, n))
    return n

  def _constant(self, name: str) -> int | None:
    i = self.by_name.get(name)
    if i is None or i.opcode != 'constant':
      return None
    m = re.search(r'constant\((-?\d+)\)', i.line)
    return int(m.group(1)) if m else None

  def trip_count_from_condition(self, loop: Instruction) -> int | None:
    """`i < N` (N constant) in the loop condition, i the tuple element `k` of the loop state,
    starting at the constant the loop's initial tuple holds there (else 0), step 1."""
    comp = self.comps[loop.called('condition')[0]]
    cmp = comp.root
    if cmp.opcode == 'fusion':                      # a wrapped compare: map its parameters back
      inner = self.comps[cmp.called('calls')[0]].root
      if inner.opcode != 'compare':
        return None
      params = self.fusion_info(cmp.called('calls')[0])[0]
      by_param = {p.name: cmp.operands[k] for k, p in params.items()}
      lhs, rhs = (by_param.get(o, o) for o in inner.operands[:2])
      cmp = inner
    elif cmp.opcode == 'compare':
      lhs, rhs = cmp.operands[:2]
    else:
      return None
    bound = self._constant(rhs)
    counter = self.by_name.get(lhs)
    if bound is None or counter is None or cmp.attr('direction') != 'LT':
      return None
    start = 0
    if counter.opcode == 'get-tuple-element':
      k = int(counter.attr('index'))
      init = self.by_name.get(loop.operands[0])
      if init is not None and init.opcode == 'tuple':
        start = self._constant(init.operands[k]) or 0
    return max(bound - start, 0)

  def conv_kernel_per_output(self, inst: Instruction) -> int:
    labels = inst.attr('dim_labels') or ''
    rhs_labels = labels.split('_')[1].split('->')[0] if '_' in labels else ''
    rhs = self.by_name[inst.operands[1]].shape.dims
    o = rhs_labels.find('o')
    return math.prod(rhs) // (rhs[o] if 0 <= o < len(rhs) else 1)

  def collective_bytes(self, inst: Instruction) -> float:
    ins = [self.by_name[o].shape.bytes for o in inst.operands]
    if inst.opcode == 'ragged-all-to-all':
      return ins[0]
    out = inst.shape.bytes
    if inst.opcode in ('all-gather-start', 'collective-permute-start'):
      out -= sum(ins)       # the -start tuple repeats its operands
    return max(sum(ins), out)

  @functools.lru_cache(maxsize=None)
  def fusion_info(self, name: str):
    """(parameter index -> instruction, name -> users, in-place updates) of a fused
    computation."""
    fused = self.comps[name]
    params = {int(re.search(r'parameter\((\d+)\)', i.line).group(1)): i
              for i in fused.instructions if i.opcode == 'parameter'}
    users = defaultdict(list)
    for i in fused.instructions:
      for o in i.operands:
        users[o].append(i)
    return params, users, _in_place_updates(fused)

  def bytes_of(self, inst: Instruction) -> float:
    op = inst.opcode
    if op in _NO_BYTES:
      return 0.0
    if op == 'copy-start':                  # (destination, source, context): one copy
      return self.by_name[inst.operands[0]].shape.hbm_bytes + Shape(inst.shape.arrays[:1]).hbm_bytes
    if op == 'slice-start':                 # counted at slice-done
      return 0.0
    if op == 'slice-done':
      return 2.0 * inst.shape.hbm_bytes
    if op == 'dynamic-slice':
      return 2.0 * inst.shape.hbm_bytes
    if op == 'dynamic-update-slice':
      return 2.0 * self.by_name[inst.operands[1]].shape.hbm_bytes
    if op != 'fusion':
      return sum(self.by_name[o].shape.hbm_bytes for o in inst.operands) + inst.shape.hbm_bytes
    params, users, in_place = self.fusion_info(inst.called('calls')[0])
    total = 0.0
    for idx, operand in enumerate(inst.operands):
      p = params.get(idx)
      us = users.get(p.name, []) if p is not None else []
      if p is not None and p.name in in_place:
        continue                            # the buffer a root dynamic-update-slice updates
      if us and all(u.opcode in _SLICING and u.operands[0] == p.name for u in us):
        total += sum(u.shape.hbm_bytes for u in us)
      else:
        total += self.by_name[operand].shape.hbm_bytes
    out = inst.shape.hbm_bytes
    if in_place:
      out = sum(self.by_name[u].shape.hbm_bytes for u in in_place.values())
    return total + out


def _in_place_updates(fused: Computation) -> dict[str, str]:
  """{parameter name: update operand name} for the root dynamic-update-slice(s) of a fusion
  that write into one of its parameters in place."""
  root = fused.root
  roots = [root]
  by_name = {i.name: i for i in fused.instructions}
  if root.opcode == 'tuple':
    roots = [by_name[o] for o in root.operands]
  out = {}
  for r in roots:
    if r.opcode == 'dynamic-update-slice' and by_name[r.operands[0]].opcode == 'parameter':
      out[r.operands[0]] = r.operands[1]
  if len(out) != len(roots):
    return {}
  return out


def _target(inst: Instruction) -> str:
  m = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
  return m.group(1) if m else ''


def _dims(v: str | None) -> list[int]:
  return [int(x) for x in re.findall(r'\d+', v or '')]


def hlo_cost(text: str, part_fn: Callable[[str], str] = part_of) -> StepCost:
  """Loop-corrected per-device cost of an optimised HLO module (`compiled.as_text()`)."""
  comps, entry = parse_module(text)
  w = _Walker(comps, part_fn, 'max')
  vec = lower = w.computation(entry, False)
  if any(i.opcode == 'conditional' for c in comps.values() for i in c.instructions):
    lower = _Walker(comps, part_fn, 'min').computation(entry, False)
  by_part = {p: {m: vec.get((p, m), 0.0) for m in METRICS} for p in PARTS}
  for (p, m), val in vec.items():
    if p not in by_part and m in METRICS:
      by_part.setdefault(p, {mm: 0.0 for mm in METRICS})[m] = val
  totals = {m: vec.total(m) for m in METRICS}
  return StepCost(totals=totals, lower={m: lower.total(m) for m in METRICS}, by_part=by_part,
                  collectives={p[len('_kind:'):]: val for (p, m), val in vec.items()
                               if m == 'by_kind' and val},
                  loops=w.loops, unknown_trip_counts=w.unknown,
                  custom_calls={p[len('_custom:'):]: val for (p, m), val in vec.items()
                                if m == 'calls' and val})


def compiled_cost(compiled, part_fn: Callable[[str], str] = part_of) -> StepCost:
  """`hlo_cost` of a `jax.stages.Compiled` (its optimised per-device HLO module)."""
  return hlo_cost(compiled.as_text(), part_fn)

