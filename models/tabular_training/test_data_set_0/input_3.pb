
Bbn_output/moving_meanJ(]=?)<˜>¿$‚?7J­¿/÷c¾õ/8¿€d?S0¿iÍ>¶ F¿