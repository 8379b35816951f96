"""pgolf search: Ray Tune + Optuna over stacks, with the artifact-size constraint checked first.

* ``spec``      the search YAML: schema and validation (all problems at once, with key paths)
* ``space``     define-by-run sampling of the space; applying a point to a stack
* ``harness``   the driver: Optuna study, sizing before training, Ray Tune, ASHA, resume
                (the only module that imports Ray and Optuna)
* ``trainable`` the Ray Tune function trainable: ``run()`` once per seed
* ``ledger``    ``trials.jsonl``, the study's record of every trial
* ``results``   ranked table, CSV, Pareto plot, best stack YAML
* ``repeat``    ``pgolf repeat`` / ``pgolf compare``; ``stats`` the one-sided Welch test

See docs/search.md.
"""
