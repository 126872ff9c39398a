"""What the report prints from its numbers: the seed spread is the sample std (ddof 1), one seed
has no spread and no verdict that needs one, and prompt alignment is a table, not raw dicts."""
import statistics

from hyforget_fast.demo import alignment_table
from hyforget_fast.unlearn.report import markdown_tables, summarize, verdicts

ROW = dict(acc_forget=0.0, acc_retain=0.98, acc_all=0.7, mia=0.1, phi=0.96, phi_bt=0.97)


def _report(seeds, keep_counts, phis):
    runs = []
    for s, fk, phi in zip(seeds, keep_counts, phis):
        runs.append({"forget": [2], "seed": s, "methods": {
            "dihyfo2": {**ROW, "phi": phi, "forget_keep": fk},
            "dihyfo2:keep": {**ROW, "acc_forget": 0.5, "forget_keep": 0},
            "retrain": {**ROW, "phi": 1.0},
            "retrieval": {**ROW, "phi": 0.90, "forget_keep": 3}}})
    rep = {"runs": runs, "seeds": list(seeds), "k": 64, "store_size": 100, "classes": [0, 1, 2, 3],
           "criterion": {"text": "validation accuracy <= 0.01 on D_f and >= 0.95 on D_r"}}
    rep["summary"] = summarize(rep)
    return rep


def test_spread_is_the_sample_std():
    counts, phis = [20, 22, 27], [0.95, 0.97, 0.96]
    rep = _report((0, 1, 2), counts, phis)
    mean, std, n = rep["summary"]["2"]["dihyfo2"]["forget_keep"]
    assert (mean, n) == (statistics.mean(counts), 3) and abs(std - statistics.stdev(counts)) < 1e-12
    assert f"{statistics.mean(counts):.1f} ± {statistics.stdev(counts):.1f} / 64" in markdown_tables(rep)
    v = "\n".join(verdicts(rep))
    assert "beyond the controls' seed-to-seed spread" in v          # 23 ± 3.6 vs 0 ± 0
    assert "beyond the seed spread" in v                            # φ 0.96 ± 0.01 vs retrieval 0.90 ± 0


def test_one_seed_prints_no_spread_and_claims_nothing_beyond_it():
    rep = _report((0,), [22], [0.96])
    assert rep["summary"]["2"]["dihyfo2"]["forget_keep"] == [22.0, None, 1]
    md, v = markdown_tables(rep), "\n".join(verdicts(rep))
    for text in (md, v):
        assert "± 0.0" not in text and "±" not in text
        assert "beyond the" not in text
    assert "One seed" in md and "spread is unknown" in md
    assert "one seed, so the seed-to-seed spread is unknown: no verdict" in v
    assert "one seed, so the seed spread is unknown (no verdict)" in v and "LOSES" not in v and "wins" not in v


def test_prompt_alignment_is_a_table_with_three_decimals():
    a = {"dihyfo2": {"r2": {"0": -0.17420698732778161, "2": 0.7271054079959318}, "r2_free_mean": 0.5658037974854709,
                     "pearson": {"0": 0.613321814464135, "2": 0.8621319146170446}}, "dihyfo1": None}
    lines = alignment_table(a)
    text = "\n".join(lines)
    assert "{" not in text and "0.7271054" not in text
    assert "| model | R² class 0 | R² class 2 | R² free-class mean | Pearson class 0 | Pearson class 2 |" in lines
    assert "| dihyfo2 | -0.174 | 0.727 | 0.566 | 0.613 | 0.862 |" in lines
    assert alignment_table({"dihyfo1": None}) == []
    a["dihyfo2"].update(r2_retrieval={"0": 0.5, "2": 0.9}, r2_retrieval_free_mean=0.7, pearson_retrieval={"0": 0.8})
    assert alignment_table(a)[-2] == "| retrieval from the store (dihyfo2's prompts) | 0.500 | 0.900 | 0.700 | 0.800 | n/a |"
    a["dihyfo2"]["guidance"] = 12.0   # the weight the record was sampled at is named
    assert alignment_table(a)[-3].startswith("| dihyfo2 (guidance 12) | -0.174 |")
