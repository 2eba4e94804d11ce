from kimi_vl_jax.evaluation import boxed


def test_extraction_nested_several_and_unclosed():
  assert boxed.all_boxed(r'\boxed{a} x \fbox{b{c}} \boxed 7') == ['a', 'b{c}', '7']
  assert boxed.last_boxed(r'\boxed{\frac{1}{\sqrt{2}}}') == r'\frac{1}{\sqrt{2}}'
  assert boxed.last_boxed(r'\boxed{1} and \boxed{2') == '1'
  assert boxed.last_boxed('no box') is None


def test_normalise():
  cases = {
      r'\frac{3}{4}': '3/4',
      r'\dfrac{a}{b}': '(a)/(b)',
      r'\left( 1, 2 \right)': '( 1, 2 )',
      r'12,345,678': '12345678',
      r'1,2': '1,2',                       # not a thousands separator
      r'\$5': '5',
      r'5\text{ m}': '5',
      r'5\,\mathrm{kg}': '5',
      r'90^\circ': '90',
      r'15\%': '15',
      r'1e5': '1e5',
      r'x.': 'x',
  }
  assert {k: boxed.normalise(k) for k in cases} == cases


def test_numbers_and_equivalence():
  assert boxed.to_number('(1/2)/3') == 1 / 6
  assert boxed.to_number('2^10') == 1024
  assert boxed.to_number('1/0') is None
  assert boxed.to_number('__import__("os")') is None
  assert boxed.to_number('2^1000') is None
  assert boxed.equivalent(r'\frac{2}{4}', '0.5')
  assert boxed.equivalent('0.3333', r'\frac{1}{3}') is False   # 1e-6 relative
  assert boxed.equivalent('0.3333333', r'\frac{1}{3}')
  assert boxed.equivalent('A', r'\text{A}')
