

@pytest.mark.slow  # about half a minute of real training
def test_a_baseline_winner_is_a_warning_at_the_end_of_optimize_and_one_line_from_confirm(tmp_path, monkeypatch,
                                                                                        restore_logging):
    """Dropout at p 0.9 alone, at a learning rate the baseline trains well with: the confirmation picks the
    baseline, which has nothing to remove."""
    monkeypatch.chdir(tmp_path)
    study = STUDY.replace("lr: 0.005", "lr: 0.05").replace("n_trials: 2", "n_trials: 2\n  confirm: {top: 1, seeds: 2, "
                                                           "ablate: true}")
    (tmp_path / "abl.yaml").write_text(study.replace("batchnorm.enabled: true", "batchnorm.enabled: false"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(cli, ["optimize", "--study", "abl.yaml", "--storage", "a.journal", "--tracking-uri",
                                      uri])
    assert result.exit_code == 0, result.output
    assert "search.confirm.ablate: the confirmed winner is the unregularized baseline (trial 0)" in result.output
    again = CliRunner().invoke(cli, ["confirm", "--study", "abl", "--storage", "a.journal", "--tracking-uri", uri,
                                     "--top", "1", "--seeds", "2", "--ablate"])
    assert again.exit_code == 2, again.output
    assert again.stderr.strip().splitlines()[-1] == (
        "Error: --ablate: the confirmed winner of study 'abl' is the unregularized baseline (trial 0): it has no "
        "regularizer to remove (the confirmation is stored)")


def test_a_pareto_study_is_refused_before_any_training():
    from regsearch._ablate import refuse_ablation
    from regsearch._errors import ConfigError

    study = optuna.create_study(study_name="front", directions=["maximize", "minimize"])
    with pytest.raises(ConfigError, match=r"^--ablate: study 'front' is a pareto study; its confirmation's winner"):
        refuse_ablation(study, True)
