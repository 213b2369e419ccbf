// The editor: the model, per stem a gain (dB) and a mute, the engine's status, the endpoint and the
// engine command. Processor, parameters and editor apart (as JUCE's example plugins): the controls
// are attached to the processor's AudioProcessorValueTreeState; the status comes from
// UnbakeProcessor::engineStatus(), read by a 4 Hz timer on the message thread. Nothing here runs on,
// or waits for, the audio thread.
#pragma once

#include "Parameters.h"
#include "Status.h"

#include <juce_audio_processors/juce_audio_processors.h>

#include <array>
#include <memory>

namespace unbake
{
class UnbakeProcessor;

class UnbakeEditor final : public juce::AudioProcessorEditor, private juce::Timer
{
public:
    static constexpr int kWidth = 560, kHeight = 420, kRefreshHz = 4;

    explicit UnbakeEditor (UnbakeProcessor&);
    ~UnbakeEditor() override;

    void paint (juce::Graphics&) override;
    void resized() override;

    void refresh();                                   // reads engineStatus() now (the timer does it 4 times a second)
    const EngineStatus& shownStatus() const noexcept { return shown; }
    bool stemDimmed (int stem) const;                 // drawn dimmed: the connected model lacks it
    juce::String stemTooltip (int stem) const;        // "not in <model>" when dimmed
    juce::Rectangle<int> stemRowBounds (int stem) const; // name, gain and mute of a stem

private:
    void timerCallback() override { refresh(); }
    void commitEndpoint();
    void commitEngineCommand();

    using SliderAttachment = juce::AudioProcessorValueTreeState::SliderAttachment;
    using ButtonAttachment = juce::AudioProcessorValueTreeState::ButtonAttachment;
    using ComboBoxAttachment = juce::AudioProcessorValueTreeState::ComboBoxAttachment;

    struct StemRow
    {
        juce::Label name;
        juce::Slider gain { juce::Slider::LinearHorizontal, juce::Slider::TextBoxRight };
        juce::ToggleButton mute { "mute" };
        juce::String tooltip; // what name, gain and mute show
        std::unique_ptr<SliderAttachment> gainAttachment;
        std::unique_ptr<ButtonAttachment> muteAttachment;
    };

    UnbakeProcessor& processor;
    juce::LookAndFeel_V4 lookAndFeel; // the editor's own colours (the default one is shared in the host)
    EngineStatus shown;

    juce::Label title, modelLabel, stemsHeading, engineHeading, connection, statusLine;
    juce::ComboBox model;
    std::unique_ptr<ComboBoxAttachment> modelAttachment;
    std::array<StemRow, kStemNames.size()> stems;

    // the engine's status: a caption and a value per row
    enum Info { endpointInfo, modelInfo, deviceInfo, stemsInfo, latencyInfo, latencyMsInfo, rateInfo, lateInfo, numInfo };
    std::array<juce::Label, numInfo> infoCaption, infoValue;

    juce::Label endpointLabel, commandLabel;
    juce::TextEditor endpointField, commandField;

    juce::TooltipWindow tooltips { this, 400 };
    juce::Rectangle<int> stemsPanel, enginePanel, settingsPanel;

    JUCE_DECLARE_NON_COPYABLE_WITH_LEAK_DETECTOR (UnbakeEditor)
};

juce::AudioProcessorEditor* createUnbakeEditor (UnbakeProcessor& processor);
} // namespace unbake
