"""The reproduction study on Fashion-MNIST (`python -m rr_jax.study run|render`).

runs: what each run trains or evaluates and its command lines; runner: executes them and
writes results/<name>.json; report: RESULTS.md from the results alone; figures: its
pictures.
"""
