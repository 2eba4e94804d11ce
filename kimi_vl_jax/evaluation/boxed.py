r"""`\boxed{...}` answers: extraction and LaTeX-aware equivalence.

Models trained on math data end a solution with `\boxed{answer}`. Extraction takes the last box of
the response (earlier ones are usually intermediate results), matching braces so nested groups
such as `\boxed{\frac{1}{2}}` come out whole; `\fbox{}` and the brace-less `\boxed 5` count too.

Equivalence normalises both sides first: math-mode delimiters, `\left` / `\right`, spacing
commands, `\text{}` / `\mathrm{}` wrappers, `\dfrac` / `\tfrac` / `\frac12` as `a/b`,
thousands separators (`1,000`), a trailing unit after a number (`5 cm`, `30^\circ`, `45%` keeps
no percent sign) and surrounding spaces and a final period. Two sides that both read as numbers
(decimals, fractions, plain arithmetic) are equal within a relative 1e-6; otherwise the normalised strings
must be equal, ignoring spaces.
"""

from __future__ import annotations

import ast
import math
import re

_BOX_COMMANDS = ('\\boxed', '\\fbox')


def _group(text: str, start: int) -> tuple[str, int] | None:
  """The `{...}` group opening at `text[start]` (nested braces matched) and the index after it."""
  if start >= len(text) or text[start] != '{':
    return None
  depth = 0
  for i in range(start, len(text)):
    if text[i] == '{':
      depth += 1
    elif text[i] == '}':
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
  return None  # unbalanced: the box never closes


def all_boxed(text: str) -> list[str]:
  """Contents of every `\boxed{}` / `\fbox{}` (and `\boxed x`) in order of appearance."""
  out = []
  pattern = re.compile('|'.join(re.escape(c) for c in _BOX_COMMANDS))
  for m in pattern.finditer(text):
    j = m.end()
    if j < len(text) and text[j] == '{':
      g = _group(text, j)
      if g is not None:
        out.append(g[0])
    elif j < len(text) and text[j] == ' ':
      token = re.match(r' +([^\s$]+)', text[j:])
      if token:
        out.append(token.group(1))
  return out


def last_boxed(text: str) -> str | None:
  """The last box's content, or None when the text has no (closed) box."""
  boxes = all_boxed(text)
  return boxes[-1] if boxes else None


def _replace_fracs(s: str) -> str:
  r"""`\frac{a}{b}` (any nesting), `\dfrac`, `\tfrac`, `\frac12` -> `(a)/(b)`."""
  s = s.replace('\\dfrac', '\\frac').replace('\\tfrac', '\\frac')
  while True:
    i = s.rfind('\\frac')  # innermost-last, so nested fractions resolve from the inside out
    if i < 0:
      return s
    j = i + len('\\frac')
    num = _group(s, j)
    if num is not None:
      den = _group(s, num[1])
      if den is None:
        if num[1] < len(s) and s[num[1]].isalnum():
          den = (s[num[1]], num[1] + 1)
        else:
          return s
      s = f'{s[:i]}({num[0]})/({den[0]}){s[den[1]:]}'
    elif j + 1 < len(s) and s[j].isalnum() and s[j + 1].isalnum():  # \frac12
      s = f'{s[:i]}({s[j]})/({s[j + 1]}){s[j + 2:]}'
    else:
      return s


# A number then a unit: degrees or percent right after it, or words after a space ("5 cm", "3 m^2";
# "2x" is an algebraic answer and stays). `\text{cm}` unwraps with a space before it.
_UNIT_TAIL = re.compile(r'^(-?[\d.]+(?:/[\d.]+)?)(?:\s*(?:\^\{?\\circ\}?|°|\\?%)|\s+[a-zA-Z][a-zA-Z\s^\d{}]*)$')


def normalise(s: str) -> str:
  """A canonical form of a short LaTeX / plain answer (see the module docstring)."""
  s = s.strip()
  box = last_boxed(s)
  if box is not None:
    s = box
  s = s.replace('\\$', '').replace('$', '').replace('\\left', '').replace('\\right', '')
  for cmd in ('\\!', '\\,', '\\;', '\\:', '\\ ', '~'):
    s = s.replace(cmd, ' ' if cmd in ('\\ ', '~') else '')
  for wrapper in ('\\text', '\\textbf', '\\mathrm', '\\mbox', '\\mathbf'):
    while wrapper + '{' in s:
      i = s.index(wrapper + '{')
      g = _group(s, i + len(wrapper))
      if g is None:
        break
      s = f'{s[:i]} {g[0]}{s[g[1]:]}'
  s = _replace_fracs(s)
  s = re.sub(r'(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])', lambda m: m.group(1) + m.group(2)
             .replace(',', ''), s)
  s = s.strip().rstrip('.').strip()
  # A parenthesised single number, as fraction replacement leaves it: "(3)" -> "3".
  s = re.sub(r'\((-?[\d.]+)\)', r'\1', s)
  m = _UNIT_TAIL.match(s)
  if m:
    s = m.group(1)
  return s.strip()


def to_number(s: str) -> float | None:
  """The value of a normalised answer that is plain arithmetic on decimals (`0.5`, `1/2`,
  `(1/2)/3`, `-3`, `2^10`), else None. Evaluated on the parsed tree, never with eval()."""
  s = s.replace(' ', '').replace('\\cdot', '*').replace('\\times', '*').replace('^', '**')
  try:
    value = float(s)
    return value if math.isfinite(value) else None
  except ValueError:
    pass
  if not s or not re.fullmatch(r'[\d.+\-*/()]+', s):
    return None
  try:
    tree = ast.parse(s, mode='eval')
    value = _arith(tree.body)
  except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
    return None
  return value if math.isfinite(value) else None


_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _arith(node) -> float:
  if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
    return float(node.value)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    v = _arith(node.operand)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    return _BINARY[type(node.op)](_arith(node.left), _arith(node.right))
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
    base, exp = _arith(node.left), _arith(node.right)
    if abs(exp) > 64:
      raise ValueError('exponent too large')
    return base ** exp
  raise ValueError(f'not arithmetic: {ast.dump(node)}')


def equivalent(prediction: str, reference: str, *, rel_tol: float = 1e-6) -> bool:
  """Whether two answers agree after `normalise` (numbers by value, else by text)."""
  p, r = normalise(prediction), normalise(reference)
  pn, rn = to_number(p), to_number(r)
  if pn is not None and rn is not None:
    return math.isclose(pn, rn, rel_tol=rel_tol, abs_tol=1e-12)
  return p.replace(' ', '') == r.replace(' ', '')


def score(response: str, reference: str) -> float:
  """1.0 when the response's last box (the whole response when it has none) equals the
  reference."""
  box = last_boxed(response)
  return float(equivalent(response if box is None else box, reference))
