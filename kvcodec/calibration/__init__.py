"""Measuring a model's `kvtc` profile (`kvcodec.transform.profile`) once, on training text
disjoint from the evaluation texts (`kvc calibrate`): see `fit`."""
