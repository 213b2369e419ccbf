#include "PluginEditor.h"
#include "PluginProcessor.h"

namespace unbake
{
juce::AudioProcessorEditor* createUnbakeEditor (UnbakeProcessor& processor)
{
    return new juce::GenericAudioProcessorEditor (processor);
}
} // namespace unbake
