"""The benchmark library (layer L5): open-loop load generation and serving metrics
(`loadgen`, `metrics`), agent-capability evaluation (`agent`), MLflow logging and run
comparison (`tracking`) and plots (`plots`). The Prefect flows that use it live in
``benchmarks/flows/`` of the checkout; ``sage-prefect bench run|compare`` drives them.

Submodules are imported explicitly (``from sage_prefect.benchmark.tracking import ...``): each
pulls in heavy libraries (MLflow, matplotlib, openai) that a bare import should not pay for.
"""
