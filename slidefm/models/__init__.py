"""slidefm.models"""
