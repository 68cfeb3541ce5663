"""Copy the tables the benchmark scripts wrote (benchmarks/results/NAME.md) into README.md,
between the markers <!-- results:NAME --> and <!-- /results:NAME -->. Nothing is typed by hand.

  python benchmarks/update_readme.py
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def main():
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    for name in re.findall(r"<!-- results:(\w+) -->", text):
        table = os.path.join(RESULTS, f"{name}.md")
        if not os.path.exists(table):
            continue
        body = open(table).read().strip()
        text = re.sub(rf"<!-- results:{name} -->.*?<!-- /results:{name} -->",
                      lambda m: f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->", text, flags=re.S)
        print("updated", name)
    open(path, "w").write(text)


if __name__ == "__main__":
    main()
