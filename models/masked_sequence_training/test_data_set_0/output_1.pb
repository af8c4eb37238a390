Bbn_features/moving_mean/newJA·¿AdÂ¾
W#>óõ¾