
Bbn_output/moving_mean/newJ(=-<?ÇÊï>h?ÖM¨øFõcæ]Ò4ø’zd?≈øˆ>y€Fø