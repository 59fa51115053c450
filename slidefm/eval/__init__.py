"""slidefm.eval"""
