def add_submit_args(p):
    pass
