"""The simulation report says every comparison at every site, losses and ties included."""
from simulation.report import verdicts


def _table():
    return {
        "pretrained heads, no fine-tuning": {"hospital-a": 0.58, "hospital-b": 0.58},
        "federated (DP)": {"hospital-a": 0.48, "hospital-b": 0.70},
        "local alone (DP)": {"hospital-a": 0.64, "hospital-b": 0.68},
    }


def test_a_loss_at_the_largest_site_is_reported_as_a_loss():
    lines = verdicts(_table(), tie_below=1 / 16)
    fed_a = [line for line in lines if line.startswith("- Federated vs hospital-a alone")]
    assert fed_a == ["- Federated vs hospital-a alone: WORSE (0.480 vs 0.640)."]


def test_a_difference_below_one_case_is_a_tie_not_a_win():
    lines = verdicts(_table(), tie_below=1 / 16)
    assert "- Federated vs hospital-b alone: tie (within the noise) (0.700 vs 0.680)." in lines


def test_a_federated_mean_below_no_fine_tuning_is_said():
    lines = verdicts(_table(), tie_below=1 / 16)
    mean = [line for line in lines if line.startswith("- Federated vs no fine-tuning at the mean")]
    # mean 0.59 vs 0.58 is within one case / sqrt(2): a tie, not the "beats" the old report printed
    assert mean == ["- Federated vs no fine-tuning at the mean over sites: tie (within the noise) (0.590 vs 0.580)."]
    assert "- Federated vs no fine-tuning at hospital-a: WORSE (0.480 vs 0.580)." in lines


def test_comparisons_whose_rows_are_missing_are_left_out():
    lines = verdicts({"federated (DP)": {"hospital-a": 0.5}}, tie_below=0.05)
    assert lines == []
