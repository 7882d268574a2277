"""Evaluation tasks of ``evaluate.py``: COCO/LVIS instance AP from boxes, prompt mIoU, segment everything."""
