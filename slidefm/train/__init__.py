"""slidefm.train"""
