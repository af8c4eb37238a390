
Bbn_input/moving_mean/newJ(_q?cëâ¿˜“Æ¾GÖk?s>@f6¿>))Í¾ŠEQ¿Š€Õ¾«Öç=