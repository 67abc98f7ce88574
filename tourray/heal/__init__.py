"""Healing a compressed model by distillation from the lake: `tourray heal` trains a student toward a
teacher run's stored next-token distribution (`tourray capture --logits`) with Ray Train
(`train.py`, losses in `losses.py`, data in `data.py`), and `tourray soup` averages students of one
shape (`soup.py`)."""
