"""slidefm.wsi"""
