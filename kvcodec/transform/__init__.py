"""What `kvtc` codes through, below the codecs: the rotary embedding a model applies to keys
(`rope`: undone before coding, redone exactly on decoding) and a model's profile (`profile`:
per layer and key/value a mean, a decorrelating transform and a sensitivity), read strictly.
Measuring a profile on a model is `kvcodec.calibration`'s."""
