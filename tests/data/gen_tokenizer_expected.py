"""Regenerates tests/data/tokenizer_expected.json from the ORIGINAL OpenAI simple_tokenizer.py.

Not part of the test run (needs the original code, which the package does not ship):
    pip download --no-deps -d /tmp/w clip-anytorch==2.6.0 && unzip -q /tmp/w/*.whl -d /tmp/w/x
    python tests/data/gen_tokenizer_expected.py tests/data/tokenizer_expected.json /tmp/w/x
"""

import importlib.util
import json
import os
import sys

wheel_dir = sys.argv[2] if len(sys.argv) > 2 else "/tmp/hx/clipwheel"
spec = importlib.util.spec_from_file_location(
    "st", os.path.join(wheel_dir, "clip", "simple_tokenizer.py")
)
st = importlib.util.module_from_spec(spec)
spec.loader.exec_module(st)
tok = st.SimpleTokenizer()
SOT, EOT = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
texts = [
    "a man is singing on a stage",
    "A Woman IS   cooking\tpasta\nin a kitchen.",
    "",
    "   ",
    "people are dancing &amp; singing",
    "tom &amp;amp; jerry",
    "a &lt;b&gt; tag &quot;quoted&quot; &#39;x&#39;",
    "café naïve résumé Ångström über façade",
    "東京の街を歩く人々",
    "emoji 😀🎉 party 🇺🇸!",
    "don't won't it's we're they've i'm you'll he'd",
    "numbers 12345 and 3.14159, 1,000,000!!!",
    "punctuation... ?!? -- (parens) [brackets] {braces} @#$%^&*",
    "mojibake: The Mona Lisa doesnâ€™t have eyebrows.",
    "“curly quotes” and ‘single’ — em dash – en dash …",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "ﬁnancial ﬂow ligatures",
    "Ελληνικά Русский текст العربية עברית हिन्दी",
    "a very long caption " + " ".join(f"word{i} token{i}" for i in range(60)),
    "a cartoon character is talking with another cartoon character in a room while the other one listens carefully and then they both go outside to play in the garden with a big red ball and a small dog",
    "<|startoftext|> special <|endoftext|> tokens",
    "tabs\tand\r\nwindows line\rbreaks",
    "zero\u200bwidth\u00a0nbsp",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "hyphen-ated words and under_scores and slash/separated",
    "x",
    "!",
]
cases = []
for t in texts:
    bpe = tok.encode(t)
    cases.append({"text": t, "bpe": bpe})
json.dump(
    {
        "source": "clip-anytorch 2.6.0 clip/simple_tokenizer.py (OpenAI CLIP), ftfy "
        + __import__("ftfy").__version__,
        "sot": SOT,
        "eot": EOT,
        "cases": cases,
    },
    open(sys.argv[1], "w"),
    ensure_ascii=True,
    indent=0,
)
print(len(cases), SOT, EOT, [len(c["bpe"]) for c in cases])
