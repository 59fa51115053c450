"""slidefm.encoders"""
