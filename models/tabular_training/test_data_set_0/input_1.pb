
Bbn_input/moving_meanJ(‰ÿj?•è¿*/ã¾ˆÆk?¼â@CÊ>_|Ş¾zÕa¿ıyİ¾ñLÇ=