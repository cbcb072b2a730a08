"""The scale harness: simulated nodes on real MQTT presence (:mod:`.fleet`) and the churn
harness around real coordinator processes (:mod:`.harness`). Used by ``tests/sim`` and
``bench/scale.py``; nothing of the coordinator's serving path imports it."""
